//! The `debian` workspace image end to end through `capvisor serve` with
//! the default manifest (issue 8): a real userland in the guest, the
//! unprivileged `agent` user, and every confinement layer of the services
//! and QEMU in force (the broker's and worker's Landlock domains must let
//! the worker format the writable layer and QEMU read the root image).

mod common;
use common::*;

#[test]
fn a_debian_vm_runs_python_bash_node_and_git_as_agent() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    let o = s.cli_ok(
        "owner",
        &["run", "--image", "debian", "--", "python3", "-c", "import ssl, sqlite3, json; print(6*7)"],
        None,
        0,
    );
    assert_eq!(stdout(&o), "42\n");
    s.cli_ok("owner", &["vm", "create", "--image", "debian", "--name", "deb"], None, 0);
    let o = s.cli_ok(
        "owner",
        &["vm", "exec", "deb", "--", "bash", "-c", "echo ${BASH_VERSION%%.*}; hostname; node -e 'console.log(6*7)'"],
        None,
        0,
    );
    assert_eq!(stdout(&o), "5\ndeb\n42\n");
    let o = s.cli_ok(
        "owner",
        &[
            "vm",
            "exec",
            "--user",
            "agent",
            "deb",
            "--",
            "bash",
            "-c",
            "id -u; echo $HOME; cd && git init -q r && cd r && git -c user.email=a@example.org -c user.name=a \
             commit -q --allow-empty -m first && git log --format=%s",
        ],
        None,
        0,
    );
    assert_eq!(stdout(&o), "1000\n/home/agent\nfirst\n");
    // An interactive shell as the agent starts in its home.
    let o = s.cli_in_pty(
        "owner",
        &["vm", "shell", "--user", "agent", "--program", "/bin/bash", "deb"],
        b"echo \"$(id -un):$PWD\"; exit 3\n",
    );
    assert_eq!(o.status.code(), Some(3), "vm shell --user: {}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("agent:/home/agent"), "vm shell --user output: {}", stdout(&o));
    // The agent cannot write what belongs to root.
    let o = s.cli("owner", &["vm", "exec", "--user", "agent", "deb", "--", "touch", "/etc/x"], None);
    assert_ne!(o.status.code(), Some(0));
    s.cli_ok("owner", &["vm", "rm", "deb"], None, 0);
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}
