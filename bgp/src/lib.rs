//! Sepal BGP speaker: wire format over netgauze-bgp-pkt, a pure RFC 4271 session FSM, the RIB
//! with the §9.1 decision process, and a tokio edge (sockets, TCP MD5, GTSM, timers).

pub mod bfd;
pub mod fsm;
mod ifaddr;
pub mod rib;
pub mod socket;
pub mod speaker;
pub mod wire;

pub use rib::{BestRoute, RouteChange, Source};
pub use speaker::{
    Error, GracefulRestartConfig, LocalRoute, MaxPrefix, PeerConfig, PeerStatus, Policy, RibEvent,
    Speaker, SpeakerConfig,
};
pub use wire::{Attrs, Family, Notification};
#[doc(hidden)]
pub mod testing;
