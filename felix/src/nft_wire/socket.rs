//! The NETLINK_NETFILTER socket the batches go to, in the network namespace it was opened in.

use std::os::fd::AsRawFd;
use std::path::Path;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use super::attrs::Batch;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("the kernel refused the batch at `{step}`: {}", std::io::Error::from_raw_os_error(*errno))]
    Refused { step: String, errno: i32 },
    #[error("the kernel did not acknowledge the batch")]
    Unacknowledged,
    #[error("not encodable over netlink: {0}")]
    Unsupported(&'static str),
}

#[derive(Debug)]
pub struct WireSocket {
    socket: Socket,
    reply: Vec<u8>,
}

impl WireSocket {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> std::io::Result<WireSocket> {
        Ok(WireSocket {
            socket: crate::route_batch::open_batch_socket(NETLINK_NETFILTER)?,
            reply: vec![0; 64 * 1024],
        })
    }

    /// A socket in the network namespace at `netns` (a /run/netns path); it stays there.
    pub fn open_in(netns: &Path) -> std::io::Result<WireSocket> {
        crate::netns::on_thread_in(netns, WireSocket::open)?
    }

    /// Sends `batch` as one transaction: all of it takes effect, or none of it.
    pub fn commit(&mut self, batch: &Batch) -> Result<(), WireError> {
        self.make_room(batch.buf.len())?;
        let sent = self.socket.send(&batch.buf, 0)?;
        if sent != batch.buf.len() {
            return Err(std::io::Error::other(format!(
                "netlink took {sent} of {} bytes",
                batch.buf.len()
            ))
            .into());
        }
        let last = batch
            .first_seq
            .wrapping_add(batch.steps.len().saturating_sub(1) as u32);
        let step = |seq: u32| {
            batch
                .steps
                .get(seq.wrapping_sub(batch.first_seq) as usize)
                .cloned()
                .unwrap_or_else(|| "the batch".into())
        };
        // The kernel has run the whole batch by the time send returns (netlink input runs in
        // the sender's context): its answers are queued. Errors come first, then the last
        // message's acknowledgement; a failure anywhere aborts the whole transaction.
        let mut refused = None;
        let mut acknowledged = false;
        loop {
            let n = match self
                .socket
                .recv(&mut &mut self.reply[..], libc::MSG_DONTWAIT)
            {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
                // Answers were lost: the kernel's verdict is unknown, so treat it as refused.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    refused.get_or_insert((last, libc::ENOBUFS));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            for (seq, errno) in crate::route_batch::replies(&self.reply[..n]) {
                if errno != 0 {
                    refused.get_or_insert((seq, errno));
                } else if seq == last {
                    acknowledged = true;
                }
            }
        }
        match refused {
            Some((seq, errno)) => Err(WireError::Refused {
                step: step(seq),
                errno,
            }),
            None if acknowledged => Ok(()),
            None => Err(WireError::Unacknowledged),
        }
    }

    /// A batch must fit the socket's send buffer whole; as root the buffer can be forced.
    fn make_room(&self, len: usize) -> std::io::Result<()> {
        if len < 200 * 1024 {
            return Ok(());
        }
        let size = (len + 64 * 1024).min(i32::MAX as usize) as libc::c_int;
        // SAFETY: setsockopt reads an int from a valid pointer for the given length.
        let rc = unsafe {
            libc::setsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
