//! BFD, asynchronous mode (RFC 5880) over single-hop UDP (RFC 5881): fast detection of a dead
//! path for the BGP sessions that run over it (RFC 5882).

pub mod packet;
pub mod runner;
pub mod session;

pub use packet::{Diag, Packet, State};
pub use runner::{Bfd, Change, PeerConfig, PeerStatus};
pub use session::{Output, Session, Status, Timers};
