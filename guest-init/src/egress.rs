//! The guest side of egress: every TCP connection a guest process opens to
//! a non-loopback IPv4 address, and every DNS query, ends in guest-init and
//! goes to the host's `Egress` capability (`schema/capnp/guest.capnp`)
//! served by the session's proxy on the virtio-serial port
//! [`EGRESS_PORT_NAME`]. docs/decisions.md, "Egress: no NIC; the guest
//! kernel steers every connection into guest-init (sk_lookup BPF)", says
//! why it is built this way.
//!
//! The guest has no NIC. Enabled by the kernel command-line word
//! [`CMDLINE_WORD`] when the port exists, [`boot`] sets up, in the calling
//! thread's network namespace ([`Steering::setup`]):
//!
//! 1. **AnyIP**: the route `local 0.0.0.0/0 dev lo table local` (rtnetlink
//!    `RTM_NEWROUTE`, rtnetlink(7)), so every IPv4 address is local and a
//!    `connect()` anywhere is answered by this kernel;
//! 2. a TCP listener on 127.0.0.1 (any port) and a UDP socket on
//!    [`DNS_ADDR`]:53, both in a `BPF_MAP_TYPE_SOCKMAP`;
//! 3. a `BPF_PROG_TYPE_SK_LOOKUP` program (Linux >= 5.9,
//!    Documentation/bpf/prog_sk_lookup.rst) attached to the namespace with
//!    `BPF_LINK_CREATE`: an IPv4 TCP connection to an address outside
//!    127/8 is assigned to the listener; an IPv4 UDP datagram to port 53
//!    outside 127/8 to the DNS socket; everything else is left alone.
//!
//! The kernel terminates TCP inside the guest; the accepted socket's local
//! address (getsockname(2)) is the destination the program asked for. The
//! [`Relay`] then calls `Egress.connect(host, port, down)`: `host` is the
//! name a fake address (198.18.0.0/15, [`crate::dns`]) stands for, or the
//! dotted IPv4 literal. Bytes flow as `ByteSink` writes of at most
//! [`capvisor_rpc::CHUNK`] in each direction, each awaited (`-> stream`
//! flow control). A refused connect, an unknown fake address, a lost
//! port or more than [`MAX_RELAYED`] connections reset the guest's
//! connection (`SO_LINGER {1, 0}`, socket(7)), so its program fails fast.
//! DNS: [`crate::dns`] answers; every question asks `Egress.resolve`.
//!
//! Everything here also runs on a Linux host as root in a fresh network
//! namespace, which is how `tests/egress.rs` tests it.

use crate::dns::{self, Answer, Parsed};
use capnp::capability::Rc as CapRc;
use capvisor_rpc::CvError;
use capvisor_schema::common_capnp::byte_sink;
use capvisor_schema::guest_capnp::egress;
use std::cell::{Cell, RefCell};
use std::ffi::CStr;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

/// How long [`boot`] waits for the egress CA (`Egress.trust`) to be
/// installed before serving the agent.
pub const TRUST_WAIT: Duration = Duration::from_secs(5);

/// The virtio-serial port the host's `Egress` is served on.
pub const EGRESS_PORT_NAME: &str = "capvisor.egress";

/// The kernel command-line word that turns egress on (the last
/// `capvisor.egress=` word wins; only `1` means on).
pub const CMDLINE_WORD: &str = "capvisor.egress=1";

/// Where the guest's resolver is told to send queries, and where the DNS
/// socket is bound (port 53).
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

/// `/etc/resolv.conf` as [`boot`] writes it (resolv.conf(5)).
pub const RESOLV_CONF: &str = "nameserver 127.0.0.53\n";

/// Relayed TCP connections open at once; the next one is reset.
pub const MAX_RELAYED: usize = 256;

/// DNS questions waiting for the host's `Egress.resolve` at once; further
/// queries are dropped (stub resolvers retry).
pub const MAX_DNS_INFLIGHT: usize = 64;

/// How long a DNS question waits for `Egress.resolve` before it is
/// answered `SERVFAIL`.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`boot`] waits for [`EGRESS_PORT_NAME`] to appear.
pub const PORT_TIMEOUT: Duration = Duration::from_secs(5);

fn log(msg: impl AsRef<str>) {
    eprintln!("guest-init: [{} ms] {}", crate::boottime_ms(), msg.as_ref());
}

/// Whether `cmdline` (a kernel command line, `/proc/cmdline`) turns
/// egress on: its last `capvisor.egress=` word is `capvisor.egress=1`.
pub fn enabled(cmdline: &str) -> bool {
    cmdline.split_whitespace().rfind(|w| w.starts_with("capvisor.egress=")) == Some(CMDLINE_WORD)
}

/// A set-up step that failed, and the error of its system call.
#[derive(Debug)]
pub struct SetupError {
    /// The step (`route`, `bpf map`, `bpf prog`, `bpf link`, ...).
    pub step: &'static str,
    /// What the kernel said.
    pub err: io::Error,
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.err)
    }
}

impl std::error::Error for SetupError {}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> SetupError {
    move |err| SetupError { step, err }
}

// ---------------------------------------------------------------------------
// AnyIP route (rtnetlink(7)).

const NLMSG_HDR: usize = 16;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;

/// Adds `local 0.0.0.0/0 dev lo table local` (what `ip route add local
/// 0.0.0.0/0 dev lo table local` does): `RTM_NEWROUTE` with an rtmsg
/// (AF_INET, dst_len 0, `RT_TABLE_LOCAL`, `RTN_LOCAL`, `RT_SCOPE_HOST`,
/// `RTPROT_BOOT`) and the attributes `RTA_TABLE` and `RTA_OIF` (lo's
/// ifindex), in the calling thread's network namespace. Replaces an equal
/// route (idempotent). Errors: the netlink socket, or the kernel's answer
/// (step `route`).
pub fn add_anyip_route() -> Result<(), SetupError> {
    // SAFETY: if_nametoindex(3) with a valid C string.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if lo == 0 {
        return Err(SetupError { step: "route: lo", err: io::Error::last_os_error() });
    }
    let mut msg = Vec::with_capacity(44);
    msg.extend_from_slice(&44u32.to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_NEWROUTE.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg.extend_from_slice(&[
        libc::AF_INET as u8,
        0, // dst_len
        0, // src_len
        0, // tos
        libc::RT_TABLE_LOCAL,
        libc::RTPROT_BOOT,
        libc::RT_SCOPE_HOST,
        libc::RTN_LOCAL,
    ]);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    for (ty, val) in [(libc::RTA_TABLE, u32::from(libc::RT_TABLE_LOCAL)), (libc::RTA_OIF, lo)] {
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&val.to_ne_bytes());
    }
    debug_assert_eq!(msg.len(), 44);
    // SAFETY: socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(SetupError { step: "route: netlink socket", err: io::Error::last_os_error() });
    }
    // SAFETY: just created, ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl is the kernel's address (pid 0, no groups).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: sendto(2) from our buffer to a valid sockaddr_nl of that size.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(SetupError { step: "route: send", err: io::Error::last_os_error() });
    }
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: recv(2) into our buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SetupError { step: "route: receive", err });
        }
        let n = n as usize;
        if n < NLMSG_HDR + 4 {
            return Err(SetupError { step: "route: receive", err: io::Error::from_raw_os_error(libc::EPROTO) });
        }
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        if ty != NLMSG_ERROR {
            continue;
        }
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return match code {
            0 => Ok(()),
            e => Err(SetupError { step: "route", err: io::Error::from_raw_os_error(-e) }),
        };
    }
}

// ---------------------------------------------------------------------------
// bpf(2): the sockmap, the sk_lookup program, the netns link.

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;

/// `union bpf_attr`, as much of it as the commands here use (128 bytes,
/// zero-filled: the kernel requires unknown tail bytes to be zero).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf_call(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a buffer of the size we pass; pointers inside it
    // point at live memory of the caller for the duration of the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len() as libc::c_uint) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// A bpf(2) command that returns a new descriptor (a map, program or link).
fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    let fd = bpf_call(cmd, attr)?;
    // SAFETY: the kernel returned a fresh descriptor (O_CLOEXEC) that is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Puts socket `fd` into the sockmap `map` at `key` (`BPF_ANY`).
fn bpf_update(map: &OwnedFd, key: u32, fd: RawFd) -> io::Result<()> {
    let value = fd as u64;
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32).u64(8, &key as *const u32 as u64).u64(16, &value as *const u64 as u64);
    bpf_call(BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
}

/// One eBPF instruction (Documentation/bpf/instruction-set.rst).
fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    [code, (src << 4) | dst, o[0], o[1], i[0], i[1], i[2], i[3]]
}

/// Offsets in `struct bpf_sk_lookup` (include/uapi/linux/bpf.h).
const CTX_FAMILY: i16 = 8;
const CTX_PROTOCOL: i16 = 12;
const CTX_LOCAL_IP4: i16 = 40;
const CTX_LOCAL_PORT: i16 = 60;
/// Helpers (include/uapi/linux/bpf.h `__BPF_FUNC_MAPPER` order).
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_SK_RELEASE: i32 = 86;
const FN_SK_ASSIGN: i32 = 124;
/// Sockmap keys.
const KEY_TCP: i32 = 0;
const KEY_DNS: i32 = 1;

/// The sk_lookup program, for the sockmap `map`:
///
/// ```text
/// if family != AF_INET || (local_ip4 & 0xff) == 127: pass
/// key = protocol == TCP ? 0 : (protocol == UDP && local_port == 53 ? 1 : pass)
/// sk = map_lookup_elem(map, &key); if !sk: pass
/// sk_assign(ctx, sk, 0); sk_release(sk); pass
/// ```
///
/// `local_ip4` is in network byte order, so its first octet is the low
/// byte of the little-endian load; `local_port` is in host order.
fn program(map: RawFd) -> Vec<u8> {
    const PASS: i16 = 27;
    const LOOKUP: i16 = 13;
    let jump = |pc: i16, to: i16| to - pc - 1;
    let p = [
        ins(0xbf, 6, 1, 0, 0),                               // 0: r6 = r1 (ctx)
        ins(0x61, 2, 6, CTX_FAMILY, 0),                      // 1: r2 = family
        ins(0x55, 2, 0, jump(2, PASS), libc::AF_INET),       // 2: if r2 != AF_INET goto pass
        ins(0x61, 2, 6, CTX_LOCAL_IP4, 0),                   // 3: r2 = local_ip4
        ins(0x57, 2, 0, 0, 0xff),                            // 4: r2 &= 0xff
        ins(0x15, 2, 0, jump(5, PASS), 127),                 // 5: if r2 == 127 goto pass
        ins(0x61, 2, 6, CTX_PROTOCOL, 0),                    // 6: r2 = protocol
        ins(0xb7, 3, 0, 0, KEY_TCP),                         // 7: r3 = KEY_TCP
        ins(0x15, 2, 0, jump(8, LOOKUP), libc::IPPROTO_TCP), // 8: if r2 == TCP goto lookup
        ins(0x55, 2, 0, jump(9, PASS), libc::IPPROTO_UDP),   // 9: if r2 != UDP goto pass
        ins(0x61, 2, 6, CTX_LOCAL_PORT, 0),                  // 10: r2 = local_port
        ins(0x55, 2, 0, jump(11, PASS), 53),                 // 11: if r2 != 53 goto pass
        ins(0xb7, 3, 0, 0, KEY_DNS),                         // 12: r3 = KEY_DNS
        ins(0x63, 10, 3, -4, 0),                             // 13 lookup: *(u32 *)(r10 - 4) = r3
        ins(0x18, 1, 1, 0, map),                             // 14: r1 = map (BPF_PSEUDO_MAP_FD)
        ins(0, 0, 0, 0, 0),                                  // 15:   (second half)
        ins(0xbf, 2, 10, 0, 0),                              // 16: r2 = r10
        ins(0x07, 2, 0, 0, -4),                              // 17: r2 += -4
        ins(0x85, 0, 0, 0, FN_MAP_LOOKUP_ELEM),              // 18: r0 = map_lookup_elem(r1, r2)
        ins(0x15, 0, 0, jump(19, PASS), 0),                  // 19: if r0 == NULL goto pass
        ins(0xbf, 1, 6, 0, 0),                               // 20: r1 = ctx
        ins(0xbf, 2, 0, 0, 0),                               // 21: r2 = sk
        ins(0xbf, 7, 0, 0, 0),                               // 22: r7 = sk
        ins(0xb7, 3, 0, 0, 0),                               // 23: r3 = 0 (flags)
        ins(0x85, 0, 0, 0, FN_SK_ASSIGN),                    // 24: sk_assign(ctx, sk, 0)
        ins(0xbf, 1, 7, 0, 0),                               // 25: r1 = sk
        ins(0x85, 0, 0, 0, FN_SK_RELEASE),                   // 26: sk_release(sk)
        ins(0xb7, 0, 0, 0, 1),                               // 27 pass: r0 = SK_PASS
        ins(0x95, 0, 0, 0, 0),                               // 28: exit
    ];
    p.concat()
}

fn load_program(map: &OwnedFd) -> io::Result<OwnedFd> {
    let insns = program(map.as_raw_fd());
    let license = c"GPL";
    let name = b"cv_egress\0\0\0\0\0\0\0";
    let load = |log: &mut [u8]| {
        let mut a = Attr::new();
        a.u32(0, BPF_PROG_TYPE_SK_LOOKUP)
            .u32(4, (insns.len() / 8) as u32)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, u32::from(!log.is_empty()))
            .u32(28, log.len() as u32)
            .u64(32, if log.is_empty() { 0 } else { log.as_mut_ptr() as u64 })
            .u32(68, BPF_SK_LOOKUP);
        a.0[48..64].copy_from_slice(name);
        bpf(BPF_PROG_LOAD, &mut a)
    };
    match load(&mut []) {
        Ok(fd) => Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EINVAL) => {
            // Ask again with the verifier's log, to say why.
            let mut log = vec![0u8; 16 * 1024];
            match load(&mut log) {
                Ok(fd) => Ok(fd),
                Err(e2) => {
                    let text =
                        CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
                    let last = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").to_string();
                    Err(io::Error::new(e2.kind(), format!("{e2} (verifier: {last})")))
                }
            }
        }
        Err(e) => Err(e),
    }
}

/// The steering set up by [`Steering::setup`]: the two sockets and the
/// BPF objects, which stay attached while this value lives (dropping it
/// detaches the program; the AnyIP route stays, so connections are then
/// refused locally).
pub struct Steering {
    listener: std::net::TcpListener,
    dns: std::net::UdpSocket,
    _map: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering").field("listener", &self.listener.local_addr().ok()).finish_non_exhaustive()
    }
}

impl Steering {
    /// Sets up the AnyIP route, the sockets, the sockmap and the attached
    /// sk_lookup program in the calling thread's network namespace
    /// (`/proc/thread-self/ns/net`); `lo` must be up. Needs
    /// `CAP_NET_ADMIN` and `CAP_BPF` (or `CAP_SYS_ADMIN`), and a kernel
    /// with `CONFIG_BPF_SYSCALL` (>= 5.9).
    ///
    /// Errors: the step that failed (`route`, `tcp listener`, `dns socket`,
    /// `bpf map`, `bpf map update`, `bpf prog`, `bpf link`) and its errno.
    pub fn setup() -> Result<Steering, SetupError> {
        add_anyip_route()?;
        let listener =
            std::net::TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).map_err(step("tcp listener"))?;
        let dns = std::net::UdpSocket::bind(SocketAddrV4::new(DNS_ADDR, 53)).map_err(step("dns socket"))?;
        let on: libc::c_int = 1;
        // SAFETY: setsockopt(2) with an int option on our socket.
        if unsafe {
            libc::setsockopt(
                dns.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        } < 0
        {
            return Err(SetupError { step: "dns socket: IP_PKTINFO", err: io::Error::last_os_error() });
        }
        listener.set_nonblocking(true).map_err(step("tcp listener"))?;
        dns.set_nonblocking(true).map_err(step("dns socket"))?;
        let mut a = Attr::new();
        a.u32(0, BPF_MAP_TYPE_SOCKMAP).u32(4, 4).u32(8, 8).u32(12, 2);
        let map = bpf(BPF_MAP_CREATE, &mut a).map_err(step("bpf map"))?;
        bpf_update(&map, KEY_TCP as u32, listener.as_raw_fd()).map_err(step("bpf map update (tcp)"))?;
        bpf_update(&map, KEY_DNS as u32, dns.as_raw_fd()).map_err(step("bpf map update (dns)"))?;
        let prog = load_program(&map).map_err(step("bpf prog"))?;
        let ns = std::fs::File::open("/proc/thread-self/ns/net").map_err(step("bpf link: netns"))?;
        let mut a = Attr::new();
        a.u32(0, prog.as_raw_fd() as u32).u32(4, ns.as_raw_fd() as u32).u32(8, BPF_SK_LOOKUP);
        let link = bpf(BPF_LINK_CREATE, &mut a).map_err(step("bpf link"))?;
        Ok(Steering { listener, dns, _map: map, _prog: prog, _link: link })
    }

    /// The TCP listener's address (127.0.0.1 and the port the kernel gave).
    pub fn tcp_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Writes [`RESOLV_CONF`] to `path` (normally `/etc/resolv.conf` of the
/// final root), replacing a file or symlink there; makes the parent
/// directory if needed.
pub fn write_resolv_conf(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.is_dir() => std::fs::remove_file(path)?,
        _ => {}
    }
    std::fs::write(path, RESOLV_CONF)
}

// ---------------------------------------------------------------------------
// The relay.

/// Bounds of a [`Relay`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// Relayed TCP connections at once ([`MAX_RELAYED`]).
    pub connections: usize,
    /// DNS questions waiting for the host at once ([`MAX_DNS_INFLIGHT`]).
    pub dns_inflight: usize,
    /// Names in the fake-address table ([`dns::MAX_FAKE_NAMES`]).
    pub fake_names: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self { connections: MAX_RELAYED, dns_inflight: MAX_DNS_INFLIGHT, fake_names: dns::MAX_FAKE_NAMES }
    }
}

/// The relay between steered guest sockets and the host's `Egress`. Lives
/// on one thread (capnp-rpc is not `Send`); run with [`Relay::run`] inside
/// a `LocalSet`.
pub struct Relay {
    limits: RelayLimits,
    upstream: RefCell<Option<egress::Client>>,
    fake: RefCell<dns::FakeAddrs>,
    active: Cell<usize>,
    dns_inflight: Cell<usize>,
}

impl Relay {
    /// A relay with no `Egress` yet (every connection is reset, every
    /// question answered `SERVFAIL`, until [`Relay::set_upstream`]).
    pub fn new(limits: RelayLimits) -> Rc<Relay> {
        Rc::new(Relay {
            limits,
            upstream: RefCell::new(None),
            fake: RefCell::new(dns::FakeAddrs::new(limits.fake_names)),
            active: Cell::new(0),
            dns_inflight: Cell::new(0),
        })
    }

    /// Sets (or, with `None`, drops) the host's `Egress` for connections
    /// and questions from now on.
    pub fn set_upstream(&self, egress: Option<egress::Client>) {
        *self.upstream.borrow_mut() = egress;
    }

    /// Relayed connections open now.
    pub fn active(&self) -> usize {
        self.active.get()
    }

    /// Serves the steered sockets of `steering` for ever (socket errors are
    /// logged and waited out). Errors: only when the sockets cannot be
    /// registered with the tokio reactor. Must run inside a `LocalSet`.
    pub async fn run(self: Rc<Self>, steering: Steering) -> io::Result<()> {
        let Steering { listener, dns, _map, _prog, _link } = steering;
        let listener = TcpListener::from_std(listener)?;
        let dns = Rc::new(UdpSocket::from_std(dns)?);
        let tcp = {
            let me = self.clone();
            async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _peer)) => me.clone().admit(stream),
                        Err(e) => {
                            // EMFILE and friends: back off rather than spin.
                            log(format!("egress: accept: {e}"));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        };
        let udp = self.clone().serve_dns(dns);
        tokio::select! {
            r = udp => r,
            () = tcp => Ok(()),
        }
    }

    fn admit(self: Rc<Self>, stream: TcpStream) {
        if self.active.get() >= self.limits.connections {
            reset(stream);
            return;
        }
        self.active.set(self.active.get() + 1);
        tokio::task::spawn_local(async move {
            self.relay_one(stream).await;
            self.active.set(self.active.get() - 1);
        });
    }

    /// Where the guest wanted to go: (host, port), or `None` to reset.
    fn destination(&self, stream: &TcpStream) -> Option<(String, u16)> {
        let SocketAddr::V4(dst) = stream.local_addr().ok()? else { return None };
        let ip = *dst.ip();
        let host = if dns::is_fake(ip) { self.fake.borrow_mut().name_of(ip)? } else { ip.to_string() };
        Some((host, dst.port()))
    }

    async fn relay_one(&self, stream: TcpStream) {
        let Some((host, port)) = self.destination(&stream) else { return reset(stream) };
        let Some(egress) = self.upstream.borrow().clone() else { return reset(stream) };
        let (rd, wr) = stream.into_split();
        let (down, mut state) = Down::new(wr);
        let mut req = egress.connect_request();
        req.get().set_host(host.as_str());
        req.get().set_port(port);
        req.get().set_down(capnp_rpc::new_client(DownSink { down: down.clone() }));
        let up = match req.send().promise.await.and_then(|r| r.get()?.get_up()) {
            Ok(up) => up,
            Err(_) => return down.abort().await,
        };
        let pump = capvisor_rpc::sink::pump(rd, &up);
        tokio::pin!(pump);
        let (mut guest_done, mut host_done) = (false, false);
        while !(guest_done && host_done) {
            tokio::select! {
                r = &mut pump, if !guest_done => match r {
                    Ok(_) => guest_done = true,
                    Err(_) => return down.abort().await,
                },
                s = state.wait_for(|s| *s != DownState::Open), if !host_done => match s.map(|s| *s) {
                    Ok(DownState::Done) | Ok(DownState::GuestGone) => host_done = true,
                    // The host dropped `down` without `done`: upstream failed.
                    _ => return down.abort().await,
                },
            }
        }
        down.close().await;
    }

    async fn serve_dns(self: Rc<Self>, sock: Rc<UdpSocket>) -> io::Result<()> {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, from, to) = match sock
                .async_io(tokio::io::Interest::READABLE, || recv_with_dst(sock.as_raw_fd(), &mut buf))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    // Not expected on an unconnected socket; do not spin.
                    log(format!("egress: dns receive: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let query = match dns::parse(&buf[..n]) {
                Parsed::Drop => continue,
                Parsed::Refuse(reply) => {
                    send_from(sock.as_raw_fd(), &reply, to, from);
                    continue;
                }
                Parsed::Query(q) => q,
            };
            if !dns::needs_resolve(&query) {
                send_from(sock.as_raw_fd(), &dns::respond(&query, Answer::NoData), to, from);
                continue;
            }
            if self.dns_inflight.get() >= self.limits.dns_inflight {
                continue;
            }
            let Some(egress) = self.upstream.borrow().clone() else {
                send_from(sock.as_raw_fd(), &dns::respond(&query, Answer::ServFail), to, from);
                continue;
            };
            self.dns_inflight.set(self.dns_inflight.get() + 1);
            let (me, sock) = (self.clone(), sock.clone());
            tokio::task::spawn_local(async move {
                let mut req = egress.resolve_request();
                req.get().set_name(query.name.as_str());
                let answer = match tokio::time::timeout(RESOLVE_TIMEOUT, req.send().promise).await {
                    Ok(Ok(r)) => match r.get().map(|r| r.get_allowed()) {
                        Ok(allowed) => dns::verdict(&query, allowed, || me.fake.borrow_mut().assign(&query.name)),
                        Err(_) => Answer::ServFail,
                    },
                    _ => Answer::ServFail,
                };
                me.dns_inflight.set(me.dns_inflight.get() - 1);
                send_from(sock.as_raw_fd(), &dns::respond(&query, answer), to, from);
            });
        }
    }
}

/// Resets `stream` (RST, not FIN): `SO_LINGER {1, 0}` then close.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// recvmsg(2) with `IP_PKTINFO` (ip(7)): (length, source, the datagram's
/// destination address as the guest program sent it).
fn recv_with_dst(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4, Ipv4Addr)> {
    // SAFETY: zeroed plain C structures, filled by recvmsg.
    let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    // SAFETY: recvmsg(2) into buffers that live for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut dst = DNS_ADDR;
    // SAFETY: walking the control messages the kernel wrote, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                dst = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let src = SocketAddrV4::new(Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr)), u16::from_be(from.sin_port));
    Ok((n as usize, src, dst))
}

/// sendmsg(2) of `data` to `to` with source address `src` (`IP_PKTINFO`
/// `ipi_spec_dst`), so the answer comes from the address the query went
/// to (a connected resolver socket ignores any other). Best effort: a
/// full socket buffer drops the answer (the stub resolver retries).
fn send_from(fd: RawFd, data: &[u8], src: Ipv4Addr, to: SocketAddrV4) {
    // SAFETY: zeroed plain C structures, filled below.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = to.port().to_be();
    sa.sin_addr.s_addr = u32::from(*to.ip()).to_be();
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut sa as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) } as _;
    // SAFETY: the control buffer is large enough for one in_pktinfo message
    // (64 bytes > CMSG_SPACE(12)); sendmsg(2) reads buffers that live for the call.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::IPPROTO_IP;
        (*c).cmsg_type = libc::IP_PKTINFO;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as _;
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr { s_addr: u32::from(src).to_be() },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
    }
}

/// How the host-to-guest direction of one relayed connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DownState {
    Open,
    /// `done`: upstream closed its write side; the guest socket got
    /// `shutdown(SHUT_WR)`.
    Done,
    /// Writing to the guest socket failed (the guest program closed it).
    GuestGone,
    /// The host dropped the sink without `done`.
    Dropped,
}

/// The guest socket's write half, shared by the `down` sink and the relay.
struct Down {
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    state: watch::Sender<DownState>,
    aborted: watch::Sender<bool>,
}

impl Down {
    fn new(wr: OwnedWriteHalf) -> (Rc<Down>, watch::Receiver<DownState>) {
        let (state, rx) = watch::channel(DownState::Open);
        (Rc::new(Down { writer: tokio::sync::Mutex::new(Some(wr)), state, aborted: watch::channel(false).0 }), rx)
    }

    fn set(&self, s: DownState) {
        self.state.send_if_modified(|cur| {
            let change = *cur == DownState::Open;
            if change {
                *cur = s;
            }
            change
        });
    }

    /// Resets the guest connection: a write in progress is abandoned, the
    /// socket gets `SO_LINGER {1, 0}` and this half is closed without a FIN
    /// (the read half is dropped by the caller, which closes the socket).
    async fn abort(&self) {
        self.aborted.send_replace(true);
        if let Some(w) = self.writer.lock().await.take() {
            let _ = w.as_ref().set_zero_linger();
            w.forget();
        }
    }

    /// Closes this half after both directions ended normally.
    async fn close(&self) {
        self.writer.lock().await.take();
    }
}

/// The `down` `ByteSink` given to `Egress.connect`: writes into the guest
/// socket; `done` half-closes it.
struct DownSink {
    down: Rc<Down>,
}

impl Drop for DownSink {
    fn drop(&mut self) {
        self.down.set(DownState::Dropped);
    }
}

fn closed() -> capnp::Error {
    CvError::unavailable("the guest closed this connection").to_rpc()
}

impl byte_sink::Server for DownSink {
    async fn write(self: CapRc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        let data = params.get()?.get_data()?;
        let mut aborted = self.down.aborted.subscribe();
        let mut guard = self.down.writer.lock().await;
        let w = guard.as_mut().ok_or_else(closed)?;
        let r = tokio::select! {
            r = w.write_all(data) => r,
            _ = aborted.wait_for(|a| *a) => return Err(closed()),
        };
        r.map_err(|_| {
            self.down.set(DownState::GuestGone);
            closed()
        })
    }

    async fn done(self: CapRc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        let mut guard = self.down.writer.lock().await;
        if let Some(w) = guard.as_mut() {
            let _ = w.shutdown().await;
        }
        self.down.set(DownState::Done);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// PID 1.

/// Keeps `relay`'s upstream connected to the `Egress` served on the
/// virtio-serial port `port`: opens it, bootstraps `Egress` (this end is
/// `Side::Client`, reader limits `capvisor_rpc::conn::INTERNAL`), and when
/// the connection ends drops the upstream (new connections are reset) and
/// opens the port again (5 ms, doubling to 1 s, between attempts that did
/// not last a second). Never returns.
pub async fn keep_connected(relay: Rc<Relay>, port: PathBuf, trusted: Option<std::sync::mpsc::SyncSender<()>>) {
    use capnp_rpc::rpc_twoparty_capnp::Side;
    let mut backoff = Duration::from_millis(5);
    let mut trusted = trusted;
    loop {
        let stream = match crate::init::open_port(&port).and_then(crate::fdio::FdStream::new) {
            Ok(s) => s,
            Err(e) => {
                log(format!("egress: open {}: {e}", port.display()));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut system =
            capvisor_rpc::conn::rpc_system_rw(stream.clone(), stream, Side::Client, None, capvisor_rpc::conn::INTERNAL);
        let egress: egress::Client = system.bootstrap(Side::Server);
        relay.set_upstream(Some(egress.clone()));
        let started = tokio::time::Instant::now();
        if let Some(tx) = trusted.take() {
            // The CA intercepted TLS is signed with, into the trust store
            // before the first exec (`boot` waits for this).
            tokio::task::spawn_local(async move {
                match egress.trust_request().send().promise.await {
                    Ok(r) => match r.get().and_then(|r| r.get_ca_cert_pem()).map(|p| p.to_string()) {
                        Ok(Ok(pem)) if pem.is_empty() => {}
                        Ok(Ok(pem)) => match crate::trust::install(&pem) {
                            Ok(()) => {
                                log(format!("egress: the capvisor egress CA is trusted ({})", crate::trust::BUNDLE))
                            }
                            Err(e) => log(format!("egress: cannot install the egress CA: {e}")),
                        },
                        _ => log("egress: trust: bad answer"),
                    },
                    Err(e) => log(format!("egress: trust: {e}")),
                }
                let _ = tx.send(());
            });
        }
        let _ = system.await;
        relay.set_upstream(None);
        if started.elapsed() > Duration::from_secs(1) {
            log("egress: host connection ended; reconnecting");
            backoff = Duration::from_millis(5);
        } else {
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Sets `kernel.unprivileged_bpf_disabled` to 1 (bpf(2) for
/// `CAP_BPF`/`CAP_SYS_ADMIN` only, until reboot; Documentation/admin-guide/
/// sysctl/kernel.rst): the minimal kernel has `CONFIG_BPF_SYSCALL` for
/// the steering, and guest programs need no BPF of their own. A kernel
/// without BPF has no such file: nothing to do. Called by [`boot`] on
/// every boot.
pub fn restrict_unprivileged_bpf() {
    let path = "/proc/sys/kernel/unprivileged_bpf_disabled";
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "0" => {
            if let Err(e) = std::fs::write(path, "1") {
                log(format!("{path}: {e}"));
            }
        }
        _ => {}
    }
}

/// PID 1's egress set-up, called after the root switch and volume mounts,
/// with `lo` up, before serving the agent. After
/// [`restrict_unprivileged_bpf`], does nothing (one read of
/// `/proc/cmdline`) unless the command line has [`CMDLINE_WORD`]. Then:
/// waits up to [`PORT_TIMEOUT`] for the port [`EGRESS_PORT_NAME`], sets up
/// [`Steering`], writes `/etc/resolv.conf` ([`RESOLV_CONF`]) and starts a
/// thread `egress` that runs the [`Relay`] with [`keep_connected`].
///
/// A failure logs one console line `egress: <step>: <error>; the guest has
/// no network` and returns: fail closed (without steering no address but
/// loopback is reachable; with steering and no host, connections reset).
pub fn boot() {
    restrict_unprivileged_bpf();
    if !enabled(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default()) {
        return;
    }
    let t0 = crate::boottime_ms();
    let deadline = std::time::Instant::now() + PORT_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    let port = loop {
        match crate::init::scan_ports(Path::new("/sys/class/virtio-ports"), EGRESS_PORT_NAME) {
            Some(p) if p.exists() => break p,
            _ if std::time::Instant::now() >= deadline => {
                log(format!(
                    "egress: port {EGRESS_PORT_NAME}: not present after {PORT_TIMEOUT:?}; the guest has no network"
                ));
                return;
            }
            _ => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
    };
    let steering = match Steering::setup() {
        Ok(s) => s,
        Err(e) => {
            log(format!("egress: {e}; the guest has no network"));
            return;
        }
    };
    if let Err(e) = write_resolv_conf(Path::new("/etc/resolv.conf")) {
        log(format!("egress: /etc/resolv.conf: {e}; names will not resolve"));
    }
    let (trusted_tx, trusted_rx) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new().name("egress".into()).spawn(move || {
        capvisor_rpc::conn::run_local(async move {
            let relay = Relay::new(RelayLimits::default());
            tokio::task::spawn_local(keep_connected(relay.clone(), port, Some(trusted_tx)));
            if let Err(e) = relay.run(steering).await {
                log(format!("egress: relay: {e}; the guest has no network"));
            }
        })
    });
    match spawned {
        Ok(_) => {
            // The first exec should already trust the CA: wait (bounded)
            // for `Egress.trust` to be answered and installed.
            if trusted_rx.recv_timeout(TRUST_WAIT).is_err() {
                log(format!("egress: no answer to trust within {TRUST_WAIT:?}; TLS may not verify until it comes"));
            }
            log(format!("egress: steering every TCP connection and DNS query ({} ms)", crate::boottime_ms() - t0))
        }
        Err(e) => log(format!("egress: thread: {e}; the guest has no network")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_egress_word_decides() {
        assert!(enabled("console=ttyS0 capvisor.egress=1 quiet"));
        assert!(!enabled("console=ttyS0 quiet"));
        assert!(!enabled("capvisor.egress=1 capvisor.egress=0"));
        assert!(enabled("capvisor.egress=0 capvisor.egress=1"));
        assert!(!enabled("capvisor.egress=yes xcapvisor.egress=1"));
    }

    #[test]
    fn program_jumps_land_inside_and_the_map_is_patched_in() {
        let p = program(42);
        assert_eq!(p.len() % 8, 0);
        let n = p.len() / 8;
        for (pc, i) in p.chunks(8).enumerate() {
            let class = i[0] & 0x07;
            let op = i[0] & 0xf0;
            if class == 0x05 && op != 0x80 && op != 0x90 {
                let off = i16::from_le_bytes([i[2], i[3]]) as isize;
                let to = pc as isize + 1 + off;
                assert!(to > pc as isize && (to as usize) < n, "jump at {pc} to {to}");
            }
        }
        assert_eq!(&p[14 * 8..14 * 8 + 8], &[0x18, 0x11, 0, 0, 42, 0, 0, 0]);
        assert_eq!(&p[(n - 1) * 8..], &[0x95, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn resolv_conf_replaces_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("stub-resolv.conf");
        std::fs::write(&target, "nameserver 10.0.0.1\n").unwrap();
        let path = dir.path().join("etc/resolv.conf");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_resolv_conf(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), RESOLV_CONF);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "nameserver 10.0.0.1\n", "link target untouched");
    }
}
