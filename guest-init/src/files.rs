//! The `Files` capability: reading, atomically writing and listing guest
//! files. Paths must be absolute guest paths.
//!
//! Error mapping (domain errors, as typed exceptions):
//! - missing path or parent directory (ENOENT, ENOTDIR in a prefix) -> `notFound`
//! - EACCES / EPERM / EROFS -> `denied`
//! - a directory where a file is expected (or the reverse), a relative or
//!   empty path, a path ending in `/` or `..` for `write` -> `invalidArgument`
//! - anything else -> `internal`
//!
//! Failures while streaming (the caller's sink breaks, a disk error during
//! `write`/`done`) are capnp exceptions.

use capnp::capability::Rc;
use capvisor_rpc::{CvError, CvResult};
use capvisor_schema::common_capnp::{byte_sink, files, FileKind};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
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
    let s = p.to_str().map_err(|_| CvError::invalid("path must be UTF-8"))?;
    if !s.starts_with('/') {
        return Err(CvError::invalid(format!("path {s:?} is not absolute")));
    }
    if s.contains('\0') {
        return Err(CvError::invalid("path contains a NUL byte"));
    }
    Ok(PathBuf::from(s))
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
    /// untouched.
    async fn write(self: Rc<Self>, params: files::WriteParams, mut results: files::WriteResults) -> capnp::Result<()> {
        let p = params.get()?;
        let mode = match p.get_mode() & 0o7777 {
            0 => 0o644,
            m => m,
        };
        let r = async {
            let path = abs_path(p.get_path().map_err(|e| CvError::invalid(e.to_string()))?)?;
            let name = match path.file_name() {
                Some(n) if !path.to_string_lossy().ends_with('/') => n.to_owned(),
                _ => return Err(CvError::invalid(format!("{} does not name a file", path.display()))),
            };
            let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
            match tokio::fs::metadata(&parent).await {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(CvError::not_found(format!("{} is not a directory", parent.display()))),
                Err(e) => return Err(io_to_cv(&parent, &e)),
            }
            if let Ok(m) = tokio::fs::metadata(&path).await {
                if m.is_dir() {
                    return Err(CvError::invalid(format!("{} is a directory", path.display())));
                }
            }
            static SEQ: AtomicU64 = AtomicU64::new(0);
            let tmp = parent.join(format!(
                ".{}.cvtmp-{}-{}",
                name.to_string_lossy(),
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let mut oo = std::fs::OpenOptions::new();
            oo.write(true).create_new(true).mode(mode).custom_flags(libc::O_CLOEXEC);
            let f = oo.open(&tmp).map_err(|e| io_to_cv(&tmp, &e))?;
            // Apply the exact mode (open(2) honours the umask).
            if let Err(e) = f.set_permissions(std::fs::Permissions::from_mode(mode)) {
                let _ = std::fs::remove_file(&tmp);
                return Err(io_to_cv(&tmp, &e));
            }
            Ok(FileSink {
                file: tokio::sync::Mutex::new(Some(tokio::fs::File::from_std(f))),
                tmp,
                dest: path,
                finished: std::cell::Cell::new(false),
            })
        };
        let sink: CvResult<FileSink> = r.await;
        results.get().set_sink(capnp_rpc::new_client::<byte_sink::Client, _>(sink?));
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
    tmp: PathBuf,
    dest: PathBuf,
    finished: std::cell::Cell<bool>,
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if !self.finished.get() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl byte_sink::Server for FileSink {
    async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        let data = params.get()?.get_data()?;
        let mut g = self.file.lock().await;
        let f = g.as_mut().ok_or_else(|| capnp::Error::failed("write after done".into()))?;
        f.write_all(data).await.map_err(|e| capnp::Error::failed(format!("{}: {e}", self.tmp.display())))
    }

    async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        let mut g = self.file.lock().await;
        let Some(mut f) = g.take() else {
            return Err(capnp::Error::failed("done called twice".into()));
        };
        let fail = |what: &str, e: std::io::Error| capnp::Error::failed(format!("{what} {}: {e}", self.dest.display()));
        f.flush().await.map_err(|e| fail("writing", e))?;
        f.sync_all().await.map_err(|e| fail("fsync", e))?;
        drop(f);
        tokio::fs::rename(&self.tmp, &self.dest).await.map_err(|e| fail("renaming into", e))?;
        self.finished.set(true);
        if let Some(parent) = self.dest.parent() {
            if let Ok(d) = tokio::fs::File::open(parent).await {
                let _ = d.sync_all().await;
            }
        }
        Ok(())
    }
}
