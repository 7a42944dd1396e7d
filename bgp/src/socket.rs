// Socket options no crate offers: TCP MD5 signatures (RFC 2385) and GTSM (RFC 5082).
// The only unsafe code in the crate: setsockopt calls on descriptors the caller owns.

use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;

/// Linux `struct tcp_md5sig` (include/uapi/linux/tcp.h).
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; 80],
}

/// Longest key the kernel accepts (TCP_MD5SIG_MAXKEYLEN).
pub const MD5_MAX_KEY: usize = 80;

/// Installs (or with an empty key, removes) the MD5 key for `peer` on a listening or connecting socket.
pub fn set_md5(fd: RawFd, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    if key.len() > MD5_MAX_KEY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "TCP MD5 key longer than 80 bytes",
        ));
    }
    // SAFETY: sockaddr_storage is plain data for which all-zero is valid.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    match peer {
        IpAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write(&mut sig.addr as *mut _ as *mut libc::sockaddr_in, sin) };
        }
        IpAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write(&mut sig.addr as *mut _ as *mut libc::sockaddr_in6, sin6) };
        }
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_MD5SIG, &sig)
}

/// Sends with TTL/hop limit 255 and drops segments arriving with less than `256 - hops` (GTSM).
pub fn set_ttl_security(fd: RawFd, v6: bool, hops: u8) -> io::Result<()> {
    set_gtsm(fd, v6, Gtsm::Hops(hops))
}

/// What a socket does about GTSM (RFC 5082).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gtsm {
    /// The kernel's default TTL, no minimum: a socket with no GTSM peer.
    Off,
    /// TTL 255 out, no minimum in: a listener shared by GTSM and other peers, whose SYN-ACKs
    /// must reach a GTSM peer (which drops anything below its own minimum) while still
    /// accepting the others; each accepted socket then gets its own peer's setting.
    Send,
    /// TTL 255 out, at least `256 - hops` in.
    Hops(u8),
}

/// Applies `g` to a TCP socket. An IPv6 socket carries IPv4-mapped peers too, so it gets the
/// IPv4 options as well (best effort: a v6-only socket may refuse them).
pub fn set_gtsm(fd: RawFd, v6: bool, g: Gtsm) -> io::Result<()> {
    // -1 restores the kernel's default TTL / hop limit; a minimum of 0 turns the check off.
    let (ttl, min): (libc::c_int, libc::c_int) = match g {
        Gtsm::Off => (-1, 0),
        Gtsm::Send => (255, 0),
        Gtsm::Hops(h) => (255, 256 - h.max(1) as libc::c_int),
    };
    let v4 = setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &ttl)
        .and_then(|()| setsockopt(fd, libc::IPPROTO_IP, libc::IP_MINTTL, &min));
    if !v6 {
        return v4;
    }
    setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, &ttl)?;
    // IPV6_MINHOPCOUNT (73) is missing from some libc versions.
    setsockopt(fd, libc::IPPROTO_IPV6, 73, &min)
}

/// Reads back a socket's IPv4 TTL and minimum TTL (for tests).
pub fn ttl_and_min_ttl(fd: RawFd) -> io::Result<(i32, i32)> {
    Ok((
        getsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL)?,
        getsockopt(fd, libc::IPPROTO_IP, libc::IP_MINTTL)?,
    ))
}

fn getsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are live and sized for an int option; the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: `val` points to a live T of the size passed; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            val as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn md5_struct_matches_kernel_size() {
        assert_eq!(std::mem::size_of::<TcpMd5Sig>(), 216);
    }

    #[test]
    fn md5_on_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        set_md5(l.as_raw_fd(), "127.0.0.2".parse().unwrap(), b"secret").unwrap();
        set_md5(l.as_raw_fd(), "127.0.0.2".parse().unwrap(), b"").unwrap();
        assert!(set_md5(l.as_raw_fd(), "127.0.0.2".parse().unwrap(), &[0; 81]).is_err());
        set_ttl_security(l.as_raw_fd(), false, 1).unwrap();
    }

    #[test]
    fn gtsm_settings_read_back() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = l.as_raw_fd();
        let (default_ttl, _) = ttl_and_min_ttl(fd).unwrap();
        set_gtsm(fd, false, Gtsm::Hops(2)).unwrap();
        assert_eq!(ttl_and_min_ttl(fd).unwrap(), (255, 254));
        set_gtsm(fd, false, Gtsm::Send).unwrap();
        assert_eq!(ttl_and_min_ttl(fd).unwrap(), (255, 0));
        set_gtsm(fd, false, Gtsm::Off).unwrap();
        assert_eq!(ttl_and_min_ttl(fd).unwrap(), (default_ttl, 0));

        let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        set_gtsm(l6.as_raw_fd(), true, Gtsm::Hops(1)).unwrap();
        assert_eq!(ttl_and_min_ttl(l6.as_raw_fd()).unwrap(), (255, 255));
    }
}
