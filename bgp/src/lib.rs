//! Sepal BGP speaker: wire format over netgauze-bgp-pkt, a pure RFC 4271 session FSM, the RIB
//! with the §9.1 decision process, and a tokio edge (sockets, TCP MD5, GTSM, timers).

pub mod fsm;
pub mod rib;
pub mod wire;
