//! Unit tests: the compiled programs run through a small classic-BPF
//! interpreter against hand-built `seccomp_data`, so the allowlist's
//! decisions are checked without installing anything.

use seccompiler::sock_filter;

use super::allowlist::kvm_nr;
use super::*;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

/// Run `prog` on seccomp_data { nr, arch, ip: 0, args }.
fn eval_arch(prog: &[sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&(nr as i32).to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    let mut a: u32 = 0;
    let mut pc = 0usize;
    loop {
        let ins = &prog[pc];
        pc += 1;
        match ins.code {
            0x20 => {
                let k = ins.k as usize;
                a = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
            }
            0x54 => a &= ins.k,
            0x05 => pc += ins.k as usize,
            0x15 | 0x25 | 0x35 | 0x45 => {
                let t = match ins.code {
                    0x15 => a == ins.k,
                    0x25 => a > ins.k,
                    0x35 => a >= ins.k,
                    _ => a & ins.k != 0,
                };
                pc += usize::from(if t { ins.jt } else { ins.jf });
            }
            0x06 => return ins.k,
            c => panic!("unexpected BPF opcode {c:#x} at {}", pc - 1),
        }
    }
}

fn eval(prog: &[sock_filter], nr: i64, args: &[u64]) -> u32 {
    let mut a = [0u64; 6];
    a[..args.len()].copy_from_slice(args);
    eval_arch(prog, AUDIT_ARCH_X86_64, nr, a)
}

fn filters() -> SeccompFilters {
    seccomp_filters(SeccompMode::Kill).unwrap()
}

const MAIN: Option<ThreadKind> = Some(ThreadKind::Main);
const VCPU: Option<ThreadKind> = Some(ThreadKind::Vcpu);
const PROCESS: Option<ThreadKind> = None;
const ALL: [Option<ThreadKind>; 3] = [MAIN, VCPU, PROCESS];

#[test]
fn sandbox_filters_compile_within_the_kernel_limit() {
    for mode in [SeccompMode::Kill, SeccompMode::Log, SeccompMode::Trap] {
        let f = seccomp_filters(mode).unwrap();
        for k in ALL {
            assert!(f.len(k) > 10 && f.len(k) < 4096, "{k:?}: {}", f.len(k));
        }
        eprintln!("{mode:?}: main {} vcpu {} process {} insns", f.len(MAIN), f.len(VCPU), f.len(PROCESS));
    }
}

#[test]
fn sandbox_network_and_exec_are_denied_everywhere() {
    let f = filters();
    for k in ALL {
        let p = f.program(k);
        for dom in [libc::AF_INET, libc::AF_INET6, libc::AF_UNIX, libc::AF_NETLINK, libc::AF_PACKET, libc::AF_VSOCK] {
            assert_eq!(
                eval(p, libc::SYS_socket, &[dom as u64, libc::SOCK_STREAM as u64, 0]),
                RET_KILL_PROCESS,
                "{k:?} socket({dom})"
            );
        }
        for nr in [
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept,
            libc::SYS_accept4,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_ptrace,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_mount,
            libc::SYS_kill,
            libc::SYS_process_vm_writev,
            libc::SYS_bpf,
            libc::SYS_io_uring_setup,
            libc::SYS_userfaultfd,
            libc::SYS_open,
            libc::SYS_openat2,
            libc::SYS_landlock_restrict_self,
        ] {
            assert_eq!(eval(p, nr, &[]), RET_KILL_PROCESS, "{k:?} syscall {nr}");
        }
    }
}

#[test]
fn sandbox_socketpair_only_unix_stream_and_sendto_only_without_address() {
    let f = filters();
    let p = f.program(MAIN);
    let st = (libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64;
    assert_eq!(eval(p, libc::SYS_socketpair, &[libc::AF_UNIX as u64, st, 0]), RET_ALLOW);
    assert_eq!(eval(p, libc::SYS_socketpair, &[libc::AF_UNIX as u64, libc::SOCK_DGRAM as u64, 0]), RET_KILL_PROCESS);
    assert_eq!(eval(p, libc::SYS_socketpair, &[libc::AF_INET as u64, st, 0]), RET_KILL_PROCESS);
    assert_eq!(eval(f.program(VCPU), libc::SYS_socketpair, &[libc::AF_UNIX as u64, st, 0]), RET_KILL_PROCESS);
    for k in ALL {
        assert_eq!(eval(f.program(k), libc::SYS_sendto, &[5, 0x1000, 10, 0, 0, 0]), RET_ALLOW);
        assert_eq!(eval(f.program(k), libc::SYS_sendto, &[5, 0x1000, 10, 0, 0x7fff_0000, 16]), RET_KILL_PROCESS);
        // upper half of the pointer alone must not pass as NULL
        assert_eq!(eval(f.program(k), libc::SYS_sendto, &[5, 0x1000, 10, 0, 0x7fff_0000_0000, 16]), RET_KILL_PROCESS);
    }
}

#[test]
fn sandbox_kvm_ioctls_by_thread_kind() {
    let f = filters();
    let ioctl = |k, req: u64| eval(f.program(k), libc::SYS_ioctl, &[7, req, 0]);
    assert_eq!(ioctl(VCPU, kvm_nr::KVM_RUN()), RET_ALLOW);
    assert_eq!(ioctl(PROCESS, kvm_nr::KVM_RUN()), RET_ALLOW);
    assert_eq!(ioctl(MAIN, kvm_nr::KVM_RUN()), RET_KILL_PROCESS);
    assert_eq!(ioctl(VCPU, kvm_nr::KVM_SET_REGS()), RET_ALLOW);
    assert_eq!(ioctl(MAIN, kvm_nr::KVM_SET_REGS()), RET_KILL_PROCESS);
    assert_eq!(ioctl(MAIN, kvm_nr::KVM_IRQFD()), RET_ALLOW);
    assert_eq!(ioctl(VCPU, kvm_nr::KVM_IRQFD()), RET_KILL_PROCESS);
    assert_eq!(ioctl(MAIN, 0x5421 /* FIONBIO */), RET_ALLOW);
    assert_eq!(ioctl(VCPU, 0x5421), RET_KILL_PROCESS);
    // the kernel takes `unsigned int cmd`: garbage in the upper half is ignored by both
    assert_eq!(ioctl(VCPU, kvm_nr::KVM_RUN() | 0xffff_ffff_0000_0000), RET_ALLOW);
    for k in ALL {
        for req in [
            kvm_nr::KVM_CREATE_VM(),
            kvm_nr::KVM_CREATE_VCPU(),
            kvm_nr::KVM_SET_USER_MEMORY_REGION(),
            0x5412, /* TIOCSTI */
        ] {
            assert_eq!(ioctl(k, req), RET_KILL_PROCESS, "{k:?} {req:#x}");
        }
    }
    // numbers match kvm-bindings' view of the structs (spot checks against kvm.h)
    assert_eq!(kvm_nr::KVM_RUN(), 0xae80);
    assert_eq!(kvm_nr::KVM_CREATE_VM(), 0xae01);
    assert_eq!(kvm_nr::KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
    assert_eq!(kvm_nr::KVM_GET_REGS(), 0x8090_ae81);
    assert_eq!(kvm_nr::KVM_IRQFD(), 0x4020_ae76);
}

#[test]
fn sandbox_clone_only_threads_and_clone3_is_enosys() {
    let f = filters();
    // glibc pthread_create: VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
    let pthread = 0x003d_0f00u64;
    assert_eq!(eval(f.program(MAIN), libc::SYS_clone, &[pthread]), RET_ALLOW);
    assert_eq!(eval(f.program(PROCESS), libc::SYS_clone, &[pthread]), RET_ALLOW);
    assert_eq!(eval(f.program(VCPU), libc::SYS_clone, &[pthread]), RET_KILL_PROCESS);
    for bad in [
        libc::SIGCHLD as u64, // fork
        pthread | libc::CLONE_NEWUSER as u64,
        pthread | libc::CLONE_NEWNET as u64,
        pthread & !(libc::CLONE_THREAD as u64),
        (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64, // posix_spawn
    ] {
        assert_eq!(eval(f.program(PROCESS), libc::SYS_clone, &[bad]), RET_KILL_PROCESS, "{bad:#x}");
    }
    let shim = f.clone3_shim();
    assert_eq!(eval(shim, libc::SYS_clone3, &[]), RET_ERRNO | libc::ENOSYS as u32);
    assert_eq!(eval(shim, libc::SYS_read, &[]), RET_ALLOW);
    assert_eq!(eval(shim, libc::SYS_socket, &[]), RET_ALLOW);
}

#[test]
fn sandbox_memory_is_never_executable_and_madvise_is_limited() {
    let f = filters();
    for k in ALL {
        let p = f.program(k);
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        assert_eq!(eval(p, libc::SYS_mmap, &[0, 4096, rw, 0x22]), RET_ALLOW);
        assert_eq!(eval(p, libc::SYS_mmap, &[0, 4096, rw | libc::PROT_EXEC as u64, 0x22]), RET_KILL_PROCESS);
        assert_eq!(eval(p, libc::SYS_mprotect, &[0x1000, 4096, libc::PROT_NONE as u64]), RET_ALLOW);
        assert_eq!(
            eval(p, libc::SYS_mprotect, &[0x1000, 4096, (libc::PROT_READ | libc::PROT_EXEC) as u64]),
            RET_KILL_PROCESS
        );
        assert_eq!(eval(p, libc::SYS_madvise, &[0x1000, 4096, libc::MADV_DONTNEED as u64]), RET_ALLOW);
        assert_eq!(eval(p, libc::SYS_madvise, &[0x1000, 4096, libc::MADV_HWPOISON as u64]), RET_KILL_PROCESS);
    }
}

#[test]
fn sandbox_signals_only_to_own_process_and_narrow_prctl_fcntl_seccomp() {
    let f = filters();
    let pid = u64::from(std::process::id());
    for k in ALL {
        assert_eq!(eval(f.program(k), libc::SYS_tgkill, &[pid, 1234, 34]), RET_ALLOW);
        assert_eq!(eval(f.program(k), libc::SYS_tgkill, &[1, 1, 9]), RET_KILL_PROCESS);
    }
    let p = f.program(PROCESS);
    assert_eq!(eval(p, libc::SYS_prctl, &[libc::PR_SET_NAME as u64]), RET_ALLOW);
    assert_eq!(eval(p, libc::SYS_prctl, &[libc::PR_SET_DUMPABLE as u64, 1]), RET_KILL_PROCESS);
    assert_eq!(eval(p, libc::SYS_prctl, &[libc::PR_SET_SECCOMP as u64]), RET_KILL_PROCESS);
    assert_eq!(eval(p, libc::SYS_fcntl, &[3, libc::F_SETFL as u64, libc::O_NONBLOCK as u64]), RET_ALLOW);
    assert_eq!(eval(p, libc::SYS_fcntl, &[3, libc::F_SETLK as u64, 0]), RET_KILL_PROCESS);
    let v = f.program(VCPU);
    assert_eq!(eval(v, libc::SYS_fcntl, &[3, libc::F_GETFD as u64]), RET_ALLOW);
    assert_eq!(eval(v, libc::SYS_fcntl, &[3, libc::F_SETFL as u64, libc::O_NONBLOCK as u64]), RET_KILL_PROCESS);
    assert_eq!(eval(p, libc::SYS_poll, &[0x1000, 2, u64::MAX]), RET_ALLOW);
    assert_eq!(eval(f.program(VCPU), libc::SYS_poll, &[0x1000, 2, u64::MAX]), RET_KILL_PROCESS);
    let filt = u64::from(libc::SECCOMP_SET_MODE_FILTER);
    assert_eq!(eval(p, libc::SYS_seccomp, &[filt, 0, 0]), RET_ALLOW);
    assert_eq!(eval(p, libc::SYS_seccomp, &[filt, libc::SECCOMP_FILTER_FLAG_LOG, 0]), RET_ALLOW);
    assert_eq!(eval(p, libc::SYS_seccomp, &[filt, libc::SECCOMP_FILTER_FLAG_NEW_LISTENER, 0]), RET_KILL_PROCESS);
    assert_eq!(eval(f.program(VCPU), libc::SYS_seccomp, &[filt, 0, 0]), RET_KILL_PROCESS);
}

#[test]
fn sandbox_other_abis_are_denied() {
    let f = seccomp_filters(SeccompMode::Log).unwrap();
    for k in ALL {
        // i386 `int 0x80` (arch mismatch) kills in every mode
        assert_eq!(eval_arch(f.program(k), AUDIT_ARCH_I386, 3, [0; 6]), RET_KILL_PROCESS);
        // x32 read (0x4000_0000 | 0): no entry, so the mode's deny action
        assert_eq!(eval(f.program(k), 0x4000_0000, &[]), RET_ERRNO | libc::EPERM as u32);
    }
}

#[test]
fn sandbox_deny_action_follows_the_mode() {
    let p = |m| seccomp_filters(m).unwrap();
    assert_eq!(eval(p(SeccompMode::Kill).program(PROCESS), libc::SYS_socket, &[2]), RET_KILL_PROCESS);
    assert_eq!(eval(p(SeccompMode::Log).program(PROCESS), libc::SYS_socket, &[2]), RET_ERRNO | libc::EPERM as u32);
    assert_eq!(eval(p(SeccompMode::Trap).program(PROCESS), libc::SYS_socket, &[2]), RET_TRAP);
    assert_eq!(SeccompMode::parse(None).unwrap(), SeccompMode::Kill);
    assert_eq!(SeccompMode::parse(Some("kill")).unwrap(), SeccompMode::Kill);
    assert_eq!(SeccompMode::parse(Some("log")).unwrap(), SeccompMode::Log);
    assert_eq!(SeccompMode::parse(Some("trap")).unwrap(), SeccompMode::Trap);
    assert!(matches!(SeccompMode::parse(Some("off")), Err(SandboxError::InvalidMode(_))));
}

#[test]
fn sandbox_process_filter_is_the_union() {
    let f = filters();
    for kind in [ThreadKind::Main, ThreadKind::Vcpu] {
        for e in allowlist(kind) {
            if e.only_if.is_none() {
                assert_eq!(eval(f.program(PROCESS), e.nr, &[]), RET_ALLOW, "{}", e.name);
                assert_eq!(eval(f.program(Some(kind)), e.nr, &[]), RET_ALLOW, "{}", e.name);
            }
        }
    }
    for (name, req) in allowlist::kvm_main_ioctls().into_iter().chain(allowlist::kvm_vcpu_ioctls()) {
        assert_eq!(eval(f.program(PROCESS), libc::SYS_ioctl, &[7, req]), RET_ALLOW, "{name}");
    }
}
