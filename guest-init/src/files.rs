//! The `Files` capability: reading, atomically writing and listing guest
//! files. Paths must be absolute guest paths.
//!
//! Error mapping (domain errors, as typed exceptions):
//! - missing path or parent directory (ENOENT, ENOTDIR in a prefix) -> `notFound`
//! - EACCES / EPERM / EROFS -> `denied`
//! - `write` with `beneath`: a path that resolves outside it (openat2(2)
//!   EXDEV / ELOOP), or a `beneath` that is or passes through a symlink
//!   -> `denied`; a path not under it as a string -> `invalidArgument`
//!   ([`PendingWrite::create`])
//! - a directory where a file is expected (or the reverse), a relative or
//!   empty path, a path ending in `/` or `..` for `write` -> `invalidArgument`
//! - anything else -> `internal`
//!
//! Failures while streaming (the caller's sink breaks, a disk error during
//! `write`/`done`) are capnp exceptions.

use capnp::capability::Rc;
use capvisor_rpc::{CvError, CvResult};
use capvisor_schema::common_capnp::{byte_sink, files, FileKind};
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, renameat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::AsyncWriteExt;

/// Maps an I/O error on `path` to the domain error (see the module docs).
pub fn io_to_cv(path: &Path, e: &std::io::Error) -> CvError {
    let msg = format!("{}: {e}", path.display());
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => CvError::not_found(msg),
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => CvError::denied(msg),
        Some(libc::EISDIR) | Some(libc::ELOOP) | Some(libc::ENAMETOOLONG) | Some(libc::EINVAL) => CvError::invalid(msg),
        _ => CvError::internal(msg),
    }
}

fn abs_path(p: capnp::text::Reader<'_>) -> CvResult<PathBuf> {
    check_abs(p.to_str().map_err(|_| CvError::invalid("path must be UTF-8"))?)
}

/// One directory entry as `Files.list` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// File name (lossy UTF-8).
    pub name: String,
    /// Kind from lstat(2) (a symlink is reported as a symlink, not followed).
    pub kind: FileKind,
    /// Size in bytes (st_size).
    pub size: u64,
    /// Permission bits (st_mode & 0o7777).
    pub mode: u32,
}

/// Lists `dir` sorted by name (byte order). Blocking.
pub fn list_dir(dir: &Path) -> CvResult<Vec<Entry>> {
    let meta = std::fs::metadata(dir).map_err(|e| io_to_cv(dir, &e))?;
    if !meta.is_dir() {
        return Err(CvError::invalid(format!("{} is not a directory", dir.display())));
    }
    let rd = std::fs::read_dir(dir).map_err(|e| io_to_cv(dir, &e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| io_to_cv(dir, &e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        // The entry may vanish between readdir and lstat: skip it then.
        let Ok(m) = std::fs::symlink_metadata(ent.path()) else {
            continue;
        };
        let ft = m.file_type();
        let kind = if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_file() {
            FileKind::File
        } else {
            FileKind::Other
        };
        out.push(Entry { name, kind, size: m.size(), mode: m.mode() & 0o7777 });
    }
    out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    Ok(out)
}

/// The `Files` capability (stateless; one per `Guest.files` call).
pub struct FilesServer;

impl files::Server for FilesServer {
    /// Streams the file at `path` into `sink` (chunks of at most
    /// `capvisor_rpc::CHUNK`), calls `done`, returns the byte count.
    async fn read(self: Rc<Self>, params: files::ReadParams, mut results: files::ReadResults) -> capnp::Result<()> {
        let p = params.get()?;
        let sink = p.get_sink()?;
        let r = async {
            let path = abs_path(p.get_path().map_err(|e| CvError::invalid(e.to_string()))?)?;
            let meta = tokio::fs::metadata(&path).await.map_err(|e| io_to_cv(&path, &e))?;
            if meta.is_dir() {
                return Err(CvError::invalid(format!("{} is a directory", path.display())));
            }
            let f = tokio::fs::File::open(&path).await.map_err(|e| io_to_cv(&path, &e))?;
            Ok::<_, CvError>(f)
        };
        let f = r.await?;
        let n = capvisor_rpc::sink::pump(f, &sink).await?;
        results.get().set_size(n);
        Ok(())
    }

    /// Opens a temporary file beside `path` and returns a sink for the
    /// body; the sink's `done` flushes, fsyncs, renames it over `path`
    /// (atomic replace) and fsyncs the directory. `mode` is the permission
    /// bits (`& 0o7777`, umask not applied); 0 means 0o644. Dropping the
    /// sink without `done` removes the temporary file and leaves `path`
    /// untouched. A non-empty `beneath` confines the write to that
    /// directory ([`PendingWrite::create`]).
    async fn write(self: Rc<Self>, params: files::WriteParams, mut results: files::WriteResults) -> capnp::Result<()> {
        let p = params.get()?;
        let text = |t: capnp::Result<capnp::text::Reader<'_>>, what: &str| -> CvResult<String> {
            t.map_err(|e| CvError::invalid(format!("{what}: {e}")))?
                .to_str()
                .map(str::to_string)
                .map_err(|_| CvError::invalid(format!("{what} must be UTF-8")))
        };
        let path = text(p.get_path(), "path")?;
        let beneath = text(p.get_beneath(), "beneath")?;
        let mode = p.get_mode();
        let pending = tokio::task::spawn_blocking(move || PendingWrite::create(&path, &beneath, mode))
            .await
            .unwrap_or_else(|e| Err(CvError::internal(format!("write task: {e}"))))?;
        let (pending, file) = pending;
        let sink = FileSink {
            file: tokio::sync::Mutex::new(Some(tokio::fs::File::from_std(file))),
            pending: std::cell::RefCell::new(Some(pending)),
        };
        results.get().set_sink(capnp_rpc::new_client::<byte_sink::Client, _>(sink));
        Ok(())
    }

    /// Lists the directory `path` (see [`list_dir`]).
    async fn list(self: Rc<Self>, params: files::ListParams, mut results: files::ListResults) -> capnp::Result<()> {
        let path = abs_path(params.get()?.get_path()?)?;
        let v = tokio::task::spawn_blocking(move || list_dir(&path))
            .await
            .unwrap_or_else(|e| Err(CvError::internal(format!("list task: {e}"))))?;
        let mut l = results.get().init_entries(v.len() as u32);
        for (i, e) in v.iter().enumerate() {
            let mut d = l.reborrow().get(i as u32);
            d.set_name(e.name.as_str());
            d.set_kind(e.kind);
            d.set_size(e.size);
            d.set_mode(e.mode);
        }
        Ok(())
    }
}

/// The sink `Files.write` returns (see [`FilesServer`]'s `write`).
struct FileSink {
    file: tokio::sync::Mutex<Option<tokio::fs::File>>,
    /// Taken by `done`; dropped with the sink otherwise (which removes the
    /// temporary file).
    pending: std::cell::RefCell<Option<PendingWrite>>,
}

impl byte_sink::Server for FileSink {
    async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        let data = params.get()?.get_data()?;
        let mut g = self.file.lock().await;
        let f = g.as_mut().ok_or_else(|| capnp::Error::failed("write after done".into()))?;
        let r = f.write_all(data).await;
        r.map_err(|e| capnp::Error::failed(format!("{}: {e}", self.dest().display())))
    }

    async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        let mut g = self.file.lock().await;
        let Some(mut f) = g.take() else {
            return Err(capnp::Error::failed("done called twice".into()));
        };
        let dest = self.dest();
        let fail = |what: &str, e: std::io::Error| capnp::Error::failed(format!("{what} {}: {e}", dest.display()));
        f.flush().await.map_err(|e| fail("writing", e))?;
        f.sync_all().await.map_err(|e| fail("fsync", e))?;
        drop(f);
        let pending =
            self.pending.borrow_mut().take().ok_or_else(|| capnp::Error::failed("done called twice".into()))?;
        tokio::task::spawn_blocking(move || pending.commit())
            .await
            .map_err(|e| capnp::Error::failed(format!("rename task: {e}")))?
            .map_err(|e| fail("renaming into", e))
    }
}

impl FileSink {
    fn dest(&self) -> PathBuf {
        self.pending.borrow().as_ref().map(|p| p.dest().to_path_buf()).unwrap_or_default()
    }
}

/// How many times an openat2(2) answering EAGAIN (a rename or mount
/// elsewhere raced the `..` resolution, see the man page) is retried.
const BENEATH_RETRIES: usize = 32;

/// A file being written by `Files.write`: a temporary file created in the
/// open destination directory, renamed over the destination by
/// [`PendingWrite::commit`] and removed when dropped uncommitted. Every
/// step after [`PendingWrite::create`] goes through the directory's
/// descriptor, so swapping a path component afterwards changes nothing.
pub struct PendingWrite {
    dir: std::fs::File,
    tmp: OsString,
    name: OsString,
    dest: PathBuf,
    committed: bool,
}

impl PendingWrite {
    /// Opens the directory of `path` and creates the temporary file in it
    /// (`.<name>.cvtmp-<pid>-<seq>`, O_EXCL) with permission bits `mode &
    /// 0o7777` exactly (0 means 0o644; the umask is not applied). Returns
    /// the pending write and the open temporary file. Blocking.
    ///
    /// `beneath` "": the directory is opened like any path (symlinks are
    /// followed). Otherwise `beneath` is an absolute directory without
    /// `..` that `path` must lie under component-wise as a string (else
    /// `invalidArgument`); `beneath` itself is opened refusing symlinks in
    /// every component (openat2 `RESOLVE_NO_SYMLINKS`; one there is
    /// `denied`), and the directory of `path` is opened from it with
    /// openat2(2) `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` (man page
    /// openat2(2), Linux 5.6+): when the kernel answers EXDEV or ELOOP (a
    /// symlink or `..` leads outside, or a magic link) the write is
    /// `denied` with `"... resolves outside <beneath>"`. The last component
    /// is never followed: the temporary file is created with O_EXCL and
    /// renamed over it, so a symlink there is replaced, not written
    /// through; whether it names a directory is checked with lstat
    /// semantics (without `beneath`: stat, as before).
    ///
    /// Missing parent directories are not created (`notFound`), with or
    /// without `beneath`. Other errors as in the module docs.
    pub fn create(path: &str, beneath: &str, mode: u32) -> CvResult<(PendingWrite, std::fs::File)> {
        let mode = match mode & 0o7777 {
            0 => 0o644,
            m => m,
        };
        let dest = check_abs(path)?;
        let name = match dest.file_name() {
            Some(n) if !path.ends_with('/') => n.to_owned(),
            _ => return Err(CvError::invalid(format!("{path} does not name a file"))),
        };
        let parent = dest.parent().unwrap_or(Path::new("/"));
        let dir = if beneath.is_empty() {
            let mut oo = std::fs::OpenOptions::new();
            oo.read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC);
            oo.open(parent).map_err(|e| io_to_cv(parent, &e))?
        } else {
            open_beneath(&dest, parent, beneath)?
        };
        let flags = if beneath.is_empty() { AtFlags::empty() } else { AtFlags::AT_SYMLINK_NOFOLLOW };
        if let Ok(st) = fstatat(Some(dir.as_raw_fd()), name.as_os_str(), flags) {
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                return Err(CvError::invalid(format!("{path} is a directory")));
            }
        }
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let mut tmp = OsString::from(".");
        tmp.push(&name);
        tmp.push(format!(".cvtmp-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        let tmp_path = parent.join(&tmp);
        let fd = openat(
            Some(dir.as_raw_fd()),
            tmp.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|e| io_to_cv(&tmp_path, &e.into()))?;
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let pending = PendingWrite { dir, tmp, name, dest, committed: false };
        // Apply the exact mode (open(2) honours the umask); dropping
        // `pending` on failure removes the temporary file.
        file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| io_to_cv(&tmp_path, &e))?;
        Ok((pending, file))
    }

    /// The destination path as the caller named it (for messages).
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Renames the temporary file over the destination (renameat(2) within
    /// the open directory) and fsyncs the directory. Blocking. On error
    /// the temporary file is removed and the destination left untouched.
    pub fn commit(mut self) -> std::io::Result<()> {
        let d = Some(self.dir.as_raw_fd());
        renameat(d, self.tmp.as_os_str(), d, self.name.as_os_str())?;
        self.committed = true;
        let _ = self.dir.sync_all();
        Ok(())
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if !self.committed {
            let _ = unlinkat(Some(self.dir.as_raw_fd()), self.tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// `path` as an absolute path without NUL bytes.
fn check_abs(path: &str) -> CvResult<PathBuf> {
    if !path.starts_with('/') {
        return Err(CvError::invalid(format!("path {path:?} is not absolute")));
    }
    if path.contains('\0') {
        return Err(CvError::invalid("path contains a NUL byte"));
    }
    Ok(PathBuf::from(path))
}

/// openat2(2) retried on EAGAIN; returns the descriptor as a `File`.
fn openat2_retry(dirfd: RawFd, path: &Path, resolve: ResolveFlag) -> Result<std::fs::File, Errno> {
    let how = OpenHow::new().flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC).resolve(resolve);
    let mut tries = 0;
    loop {
        match openat2(dirfd, path, how) {
            // SAFETY: `fd` was just opened and is owned by nothing else.
            Ok(fd) => return Ok(unsafe { std::fs::File::from_raw_fd(fd) }),
            Err(Errno::EAGAIN) if tries < BENEATH_RETRIES => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Opens directory `parent` of `dest` resolved beneath `beneath` (see
/// [`PendingWrite::create`]).
fn open_beneath(dest: &Path, parent: &Path, beneath: &str) -> CvResult<std::fs::File> {
    let base = check_abs(beneath).map_err(|e| CvError::invalid(format!("beneath: {}", e.message)))?;
    if base.components().any(|c| c == Component::ParentDir) {
        return Err(CvError::invalid(format!("beneath {beneath:?} contains \"..\"")));
    }
    let rel = parent
        .strip_prefix(&base)
        .map_err(|_| CvError::invalid(format!("{} is not under {beneath}", dest.display())))?;
    let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    let root = openat2_retry(libc::AT_FDCWD, &base, ResolveFlag::RESOLVE_NO_SYMLINKS).map_err(|e| match e {
        Errno::ELOOP => CvError::denied(format!("{beneath} is or passes through a symlink")),
        e => io_to_cv(&base, &e.into()),
    })?;
    openat2_retry(root.as_raw_fd(), rel, ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS).map_err(
        |e| match e {
            Errno::EXDEV | Errno::ELOOP => {
                let why = "a symlink or \"..\" leads out, or a magic link";
                CvError::denied(format!("{} resolves outside {beneath} ({why}; openat2: {e})", dest.display()))
            }
            e => io_to_cv(parent, &e.into()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use capvisor_schema::common_capnp::ErrorCode;
    use std::io::Write;
    use std::os::unix::fs::symlink;

    /// A temp dir holding `work/` (the prefix) and `secret/` (outside it).
    struct Tree {
        _dir: tempfile::TempDir,
        root: PathBuf,
        work: String,
    }

    fn tree() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir(root.join("work")).unwrap();
        std::fs::create_dir(root.join("secret")).unwrap();
        let work = root.join("work").to_str().unwrap().to_string();
        Tree { _dir: dir, root, work }
    }

    impl Tree {
        fn p(&self, rel: &str) -> String {
            format!("{}/{rel}", self.root.display())
        }
        fn secret_is_empty(&self) -> bool {
            std::fs::read_dir(self.root.join("secret")).unwrap().next().is_none()
        }
    }

    fn write(path: &str, beneath: &str, mode: u32, body: &[u8]) -> CvResult<()> {
        let (pending, mut f) = PendingWrite::create(path, beneath, mode)?;
        f.write_all(body).unwrap();
        drop(f);
        pending.commit().map_err(|e| CvError::internal(e.to_string()))
    }

    fn denied_outside(r: CvResult<()>, t: &Tree) {
        let e = r.unwrap_err();
        assert_eq!(e.code, ErrorCode::Denied, "{e:?}");
        assert!(e.message.contains(&format!("resolves outside {}", t.work)), "{e:?}");
    }

    #[test]
    fn a_plain_write_beneath_the_prefix_works() {
        let t = tree();
        std::fs::create_dir(t.root.join("work/sub")).unwrap();
        write(&t.p("work/sub/a.txt"), &t.work, 0o600, b"hello").unwrap();
        let m = std::fs::metadata(t.p("work/sub/a.txt")).unwrap();
        assert_eq!((std::fs::read(t.p("work/sub/a.txt")).unwrap(), m.mode() & 0o7777), (b"hello".to_vec(), 0o600));
        // Directly in the prefix, through a `..` that stays beneath, with a trailing-slash prefix.
        write(&t.p("work/b"), &t.work, 0, b"b").unwrap();
        write(&t.p("work/sub/../c"), &format!("{}/", t.work), 0, b"c").unwrap();
        assert_eq!(std::fs::read(t.p("work/c")).unwrap(), b"c");
        // A relative symlink that stays beneath is followed.
        symlink("sub", t.root.join("work/inside")).unwrap();
        write(&t.p("work/inside/d"), &t.work, 0, b"d").unwrap();
        assert_eq!(std::fs::read(t.p("work/sub/d")).unwrap(), b"d");
        let names: Vec<_> =
            std::fs::read_dir(t.root.join("work/sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
    }

    #[test]
    fn a_symlinked_directory_leading_out_is_refused() {
        let t = tree();
        symlink(t.root.join("secret"), t.root.join("work/out")).unwrap();
        symlink("../secret", t.root.join("work/rel")).unwrap();
        std::fs::create_dir(t.root.join("work/sub")).unwrap();
        symlink("../../secret", t.root.join("work/sub/deep")).unwrap();
        denied_outside(write(&t.p("work/out/x"), &t.work, 0, b"x"), &t);
        denied_outside(write(&t.p("work/rel/x"), &t.work, 0, b"x"), &t);
        denied_outside(write(&t.p("work/sub/deep/x"), &t.work, 0, b"x"), &t);
        assert!(t.secret_is_empty());
        // Without `beneath` the same path goes through the symlink (what the check stops).
        write(&t.p("work/out/x"), "", 0, b"x").unwrap();
        assert!(!t.secret_is_empty());
    }

    #[test]
    fn dot_dot_out_of_the_prefix_is_refused() {
        let t = tree();
        denied_outside(write(&t.p("work/../secret/x"), &t.work, 0, b"x"), &t);
        std::fs::create_dir(t.root.join("work/sub")).unwrap();
        denied_outside(write(&t.p("work/sub/../../secret/x"), &t.work, 0, b"x"), &t);
        assert!(t.secret_is_empty());
        let e = write(&t.p("work/x"), &format!("{}/../secret", t.work), 0, b"x").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
    }

    #[test]
    fn a_symlink_as_the_last_component_is_replaced_not_followed() {
        let t = tree();
        std::fs::write(t.root.join("secret/f"), b"keep").unwrap();
        symlink(t.root.join("secret/f"), t.root.join("work/link")).unwrap();
        symlink(t.root.join("secret"), t.root.join("work/dirlink")).unwrap();
        write(&t.p("work/link"), &t.work, 0, b"new").unwrap();
        write(&t.p("work/dirlink"), &t.work, 0, b"new").unwrap();
        assert_eq!(std::fs::read(t.root.join("secret/f")).unwrap(), b"keep");
        for l in ["work/link", "work/dirlink"] {
            assert!(std::fs::symlink_metadata(t.p(l)).unwrap().is_file(), "{l}");
        }
        // A real directory there is still refused.
        std::fs::create_dir(t.root.join("work/d")).unwrap();
        assert_eq!(write(&t.p("work/d"), &t.work, 0, b"x").unwrap_err().code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn paths_not_under_the_prefix_and_bad_prefixes_are_invalid_or_denied() {
        let t = tree();
        std::fs::create_dir(t.root.join("workshop")).unwrap();
        for (path, beneath) in [
            (t.p("secret/x"), t.work.clone()),
            (t.p("workshop/x"), t.work.clone()),
            (t.work.clone(), t.work.clone()),
            (t.p("work/x"), "work".to_string()),
        ] {
            let e = write(&path, &beneath, 0, b"x").unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{path} beneath {beneath}: {e:?}");
        }
        // A prefix that is itself a symlink (swapped in by someone who can exec) is denied.
        symlink(t.root.join("secret"), t.root.join("alias")).unwrap();
        let e = write(&t.p("alias/x"), &t.p("alias"), 0, b"x").unwrap_err();
        assert_eq!(e.code, ErrorCode::Denied, "{e:?}");
        assert!(t.secret_is_empty());
        let e = write(&t.p("missing/x"), &t.p("missing"), 0, b"x").unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound, "{e:?}");
    }

    #[test]
    fn missing_parent_directories_are_not_found_and_not_created() {
        let t = tree();
        for beneath in [t.work.as_str(), ""] {
            let e = write(&t.p("work/a/b/c"), beneath, 0, b"x").unwrap_err();
            assert_eq!(e.code, ErrorCode::NotFound, "{e:?}");
        }
        assert!(!t.root.join("work/a").exists());
    }

    #[test]
    fn an_uncommitted_write_leaves_nothing() {
        let t = tree();
        std::fs::write(t.p("work/keep"), b"original").unwrap();
        let (pending, mut f) = PendingWrite::create(&t.p("work/keep"), &t.work, 0).unwrap();
        f.write_all(b"partial").unwrap();
        drop((pending, f));
        assert_eq!(std::fs::read(t.p("work/keep")).unwrap(), b"original");
        assert_eq!(std::fs::read_dir(t.root.join("work")).unwrap().count(), 1);
    }
}
