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

/// Sends with TTL/hop limit 255 and, when `min_ttl` is set, drops packets arriving with less (GTSM).
pub fn set_ttl_security(fd: RawFd, v6: bool, hops: u8) -> io::Result<()> {
    let min = 256 - (hops.max(1) as libc::c_int);
    if v6 {
        setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_UNICAST_HOPS,
            &255 as &libc::c_int,
        )?;
        // IPV6_MINHOPCOUNT (73) is missing from some libc versions.
        setsockopt(fd, libc::IPPROTO_IPV6, 73, &min)
    } else {
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &255 as &libc::c_int)?;
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_MINTTL, &min)
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
}
