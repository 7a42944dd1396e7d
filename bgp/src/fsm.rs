// The per-session RFC 4271 §8 state machine: one transition function, events in, actions out.
// No sockets, no clocks: timers are deadlines the caller checks with `poll_timers(now)`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::wire::{Capabilities, Family, GracefulRestart, Message, Notification, Open, Update};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

/// What a session needs to know about its configuration.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    pub remote_as: u32,
    pub passive: bool,
    pub connect_retry: Duration,
    /// Hold time we offer; 0 disables keepalives (RFC 4271 §4.2).
    pub hold_time: u16,
    /// Keepalive interval; default hold/3.
    pub keepalive: Option<u16>,
    pub families: Vec<Family>,
    pub graceful_restart: Option<GracefulRestart>,
    /// Offer RFC 8950 IPv4-over-IPv6 next hops.
    pub extended_next_hop: bool,
}

impl SessionConfig {
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            families: self.families.clone(),
            asn4: Some(self.local_as),
            route_refresh: true,
            graceful_restart: self.graceful_restart.clone(),
            extended_next_hop_v4: self.extended_next_hop,
            extended_message: false,
        }
    }
}

/// What both OPENs agreed on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Negotiated {
    pub hold_time: u16,
    pub keepalive: u16,
    pub asn4: bool,
    pub families: Vec<Family>,
    pub peer_router_id: Ipv4Addr,
    pub peer_as: u32,
    pub route_refresh: bool,
    pub extended_next_hop_v4: bool,
    pub peer_graceful_restart: Option<GracefulRestart>,
}

/// Inputs. Each variant names the RFC 4271 §8.1 events it folds together.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Events 1/3/4/5: (automatic) start, passive or not per config.
    Start,
    /// Events 2/8: (automatic) stop, with the Cease to send.
    Stop(Notification),
    /// Events 16/17: TCP connection up (outgoing confirmed or incoming accepted).
    TcpConnected,
    /// Event 18: TCP connection failed or closed.
    TcpFailed,
    /// Events 19-28: a decoded message.
    Message(Message),
    /// Events 21/22/28 error side: the decoder's NOTIFICATION for a bad message.
    DecodeError(Notification),
}

/// Outputs for the edge to carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Connect,
    Disconnect,
    SendOpen,
    SendKeepalive,
    SendNotification(Notification),
    Established(Negotiated),
    Update(Box<Update>),
    RouteRefresh(Family),
    /// The session left Established (or never got there) for this reason.
    Down(DownReason),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum DownReason {
    /// The peer sent this NOTIFICATION.
    Received(Notification),
    /// We sent this NOTIFICATION.
    Sent(Notification),
    /// TCP closed without NOTIFICATION (graceful restart applies).
    ConnectionLost,
    Stopped,
}

/// A BGP session: state and timer deadlines.
#[derive(Debug, Clone)]
pub struct Session {
    pub cfg: SessionConfig,
    pub state: State,
    pub negotiated: Option<Negotiated>,
    connect_retry_at: Option<Instant>,
    hold_at: Option<Instant>,
    keepalive_at: Option<Instant>,
    /// Idle with automatic restart after this deadline (damped backoff).
    idle_until: Option<Instant>,
    /// Consecutive failures, for the exponential backoff.
    failures: u32,
    started: bool,
    /// Seed for the jitter so tests stay deterministic.
    jitter_seed: u64,
}

/// The large hold time used until the OPEN arrives (RFC 4271 §8.2.2: 4 minutes suggested).
const OPEN_HOLD: Duration = Duration::from_secs(240);
const MAX_BACKOFF: Duration = Duration::from_secs(120);

impl Session {
    pub fn new(cfg: SessionConfig, jitter_seed: u64) -> Session {
        Session {
            cfg,
            state: State::Idle,
            negotiated: None,
            connect_retry_at: None,
            hold_at: None,
            keepalive_at: None,
            idle_until: None,
            failures: 0,
            started: false,
            jitter_seed,
        }
    }

    /// Earliest pending deadline, for the edge's sleep.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.connect_retry_at,
            self.hold_at,
            self.keepalive_at,
            self.idle_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// RFC 4271 §10: jitter timers by 75-100 %.
    fn jitter(&mut self, d: Duration) -> Duration {
        self.jitter_seed = self
            .jitter_seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let frac = 75 + (self.jitter_seed >> 33) % 26;
        d * frac as u32 / 100
    }

    fn start_connect_retry(&mut self, now: Instant) {
        let d = self.jitter(self.cfg.connect_retry);
        self.connect_retry_at = Some(now + d);
    }

    fn clear_timers(&mut self) {
        self.connect_retry_at = None;
        self.hold_at = None;
        self.keepalive_at = None;
    }

    /// Goes to Idle; a started session restarts by itself after a backoff that doubles per failure.
    fn enter_idle(&mut self, now: Instant, out: &mut Vec<Action>, reason: DownReason) {
        let was_up = self.state != State::Idle;
        self.clear_timers();
        self.state = State::Idle;
        self.negotiated = None;
        if was_up {
            out.push(Action::Disconnect);
            out.push(Action::Down(reason.clone()));
        }
        if self.started && reason != DownReason::Stopped {
            self.failures = self.failures.saturating_add(1);
            let base = self.cfg.connect_retry.max(Duration::from_millis(100));
            let back = base
                .saturating_mul(1u32 << self.failures.min(7).saturating_sub(1))
                .min(MAX_BACKOFF);
            let d = self.jitter(back);
            self.idle_until = Some(now + d);
        }
    }

    fn fail(&mut self, now: Instant, n: Notification, out: &mut Vec<Action>) {
        out.push(Action::SendNotification(n.clone()));
        self.enter_idle(now, out, DownReason::Sent(n));
    }

    fn leave_idle(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.idle_until = None;
        if self.cfg.passive {
            self.state = State::Active;
        } else {
            self.state = State::Connect;
            self.start_connect_retry(now);
            out.push(Action::Connect);
        }
    }

    fn start_hold(&mut self, now: Instant) {
        self.hold_at = match &self.negotiated {
            Some(n) if n.hold_time == 0 => None,
            Some(n) => Some(now + Duration::from_secs(n.hold_time as u64)),
            None => Some(now + OPEN_HOLD),
        };
    }

    fn start_keepalive(&mut self, now: Instant) {
        self.keepalive_at = match &self.negotiated {
            Some(n) if n.keepalive > 0 => Some(now + Duration::from_secs(n.keepalive as u64)),
            _ => None,
        };
    }

    /// Fires expired timers (events 9, 10, 11, 13) and returns the actions.
    pub fn poll_timers(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.idle_until.is_some_and(|t| t <= now) && self.state == State::Idle {
            self.leave_idle(now, &mut out);
        }
        if self.hold_at.is_some_and(|t| t <= now) {
            self.hold_at = None;
            self.fail(now, Notification::new(4, 0, vec![]), &mut out);
        }
        if self.connect_retry_at.is_some_and(|t| t <= now) {
            self.connect_retry_at = None;
            match self.state {
                State::Connect | State::Active => {
                    out.push(Action::Disconnect);
                    if self.cfg.passive {
                        self.state = State::Active;
                    } else {
                        self.state = State::Connect;
                        out.push(Action::Connect);
                    }
                    self.start_connect_retry(now);
                }
                _ => {}
            }
        }
        if self.keepalive_at.is_some_and(|t| t <= now) {
            self.keepalive_at = None;
            if matches!(self.state, State::OpenConfirm | State::Established) {
                out.push(Action::SendKeepalive);
                self.start_keepalive(now);
            }
        }
        out
    }

    /// The transition function.
    pub fn handle(&mut self, now: Instant, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match (self.state, ev) {
            (_, Event::Stop(n)) => {
                self.started = false;
                self.idle_until = None;
                if matches!(
                    self.state,
                    State::OpenSent | State::OpenConfirm | State::Established
                ) {
                    out.push(Action::SendNotification(n));
                }
                self.enter_idle(now, &mut out, DownReason::Stopped);
                self.failures = 0;
            }
            (State::Idle, Event::Start) => {
                self.started = true;
                self.leave_idle(now, &mut out);
            }
            (State::Idle, _) => {}
            (_, Event::Start) => {}
            (State::Connect | State::Active, Event::TcpConnected) => {
                self.connect_retry_at = None;
                out.push(Action::SendOpen);
                self.state = State::OpenSent;
                self.start_hold(now);
            }
            (State::Connect, Event::TcpFailed) => {
                self.state = State::Active;
                self.start_connect_retry(now);
            }
            (State::Active, Event::TcpFailed) => self.start_connect_retry(now),
            (State::Connect | State::Active, Event::Message(_) | Event::DecodeError(_)) => {
                // No connection should be delivering messages here (RFC 4271 §8.2.2: FSM error).
                self.fail(now, Notification::new(5, 0, vec![]), &mut out);
            }
            (_, Event::TcpConnected) => {}
            (State::OpenSent, Event::TcpFailed) => {
                // Event 18 in OpenSent: back to Active and wait for the peer or the retry timer.
                self.hold_at = None;
                self.state = State::Active;
                self.start_connect_retry(now);
                out.push(Action::Disconnect);
            }
            (_, Event::TcpFailed) => self.enter_idle(now, &mut out, DownReason::ConnectionLost),
            (_, Event::DecodeError(n)) => self.fail(now, n, &mut out),
            (_, Event::Message(Message::Notification(n))) => {
                // RFC 4271 §6.2: a version error NOTIFICATION in OpenSent is not counted as a failure.
                self.enter_idle(now, &mut out, DownReason::Received(n));
            }
            (State::OpenSent, Event::Message(Message::Open(o))) => match self.check_open(&o) {
                Ok(neg) => {
                    self.negotiated = Some(neg);
                    out.push(Action::SendKeepalive);
                    self.state = State::OpenConfirm;
                    self.start_hold(now);
                    self.start_keepalive(now);
                }
                Err(n) => self.fail(now, n, &mut out),
            },
            (State::OpenSent, Event::Message(_)) => {
                self.fail(now, Notification::new(5, 1, vec![]), &mut out)
            }
            (State::OpenConfirm, Event::Message(Message::Keepalive)) => {
                self.state = State::Established;
                self.failures = 0;
                self.start_hold(now);
                if let Some(n) = &self.negotiated {
                    out.push(Action::Established(n.clone()));
                }
            }
            (State::OpenConfirm, Event::Message(_)) => {
                self.fail(now, Notification::new(5, 2, vec![]), &mut out)
            }
            (State::Established, Event::Message(m)) => match m {
                Message::Keepalive => self.start_hold(now),
                Message::Update(u) => {
                    self.start_hold(now);
                    out.push(Action::Update(u));
                }
                Message::RouteRefresh(f) => {
                    self.start_hold(now);
                    out.push(Action::RouteRefresh(f));
                }
                Message::Open(_) => self.fail(now, Notification::new(5, 3, vec![]), &mut out),
                Message::Notification(_) => {}
            },
        }
        out
    }

    /// OPEN validation (RFC 4271 §6.2) and capability negotiation.
    pub fn check_open(&self, o: &Open) -> Result<Negotiated, Notification> {
        if o.asn != self.cfg.remote_as {
            // Data: the 2-octet My Autonomous System field as received (AS_TRANS for 4-octet ASes).
            let two = u16::try_from(o.asn).unwrap_or(crate::wire::AS_TRANS);
            return Err(Notification::new(2, 2, two.to_be_bytes().to_vec()));
        }
        let ibgp = o.asn == self.cfg.local_as;
        if ibgp && o.router_id == self.cfg.router_id {
            return Err(Notification::new(2, 3, o.router_id.octets().to_vec()));
        }
        let hold = self.cfg.hold_time.min(o.hold_time);
        let keepalive = match self.cfg.keepalive {
            _ if hold == 0 => 0,
            Some(k) => k.min(hold / 3).max(1),
            None => (hold / 3).max(1),
        };
        let families: Vec<Family> = self
            .cfg
            .families
            .iter()
            .copied()
            .filter(|f| o.caps.families.contains(f))
            .collect();
        Ok(Negotiated {
            hold_time: hold,
            keepalive,
            asn4: o.caps.asn4.is_some(),
            families,
            peer_router_id: o.router_id,
            peer_as: o.asn,
            route_refresh: o.caps.route_refresh,
            extended_next_hop_v4: self.cfg.extended_next_hop && o.caps.extended_next_hop_v4,
            peer_graceful_restart: o.caps.graceful_restart.clone(),
        })
    }
}

/// RFC 4271 §6.8 collision resolution: true when the connection we initiated survives.
pub fn keep_outgoing(local_id: Ipv4Addr, remote_id: Ipv4Addr) -> bool {
    u32::from(local_id) > u32::from(remote_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SessionConfig {
        SessionConfig {
            local_as: 65001,
            router_id: Ipv4Addr::new(1, 1, 1, 1),
            remote_as: 65002,
            passive: false,
            connect_retry: Duration::from_secs(1),
            hold_time: 9,
            keepalive: None,
            families: vec![Family::Ipv4, Family::Ipv6],
            graceful_restart: None,
            extended_next_hop: false,
        }
    }

    fn open(asn: u32, hold: u16) -> Message {
        Message::Open(Open {
            version: 4,
            asn,
            hold_time: hold,
            router_id: Ipv4Addr::new(2, 2, 2, 2),
            caps: Capabilities {
                families: vec![Family::Ipv4],
                asn4: Some(asn),
                ..Default::default()
            },
            has_mp: true,
        })
    }

    fn establish(s: &mut Session, t: Instant) {
        assert_eq!(s.handle(t, Event::Start), vec![Action::Connect]);
        assert_eq!(s.handle(t, Event::TcpConnected), vec![Action::SendOpen]);
        assert_eq!(
            s.handle(t, Event::Message(open(65002, 30))),
            vec![Action::SendKeepalive]
        );
        let a = s.handle(t, Event::Message(Message::Keepalive));
        assert!(
            matches!(&a[..], [Action::Established(n)] if n.hold_time == 9 && n.keepalive == 3 && n.families == vec![Family::Ipv4])
        );
        assert_eq!(s.state, State::Established);
    }

    #[test]
    fn establishes_and_keeps_alive() {
        let t = Instant::now();
        let mut s = Session::new(cfg(), 1);
        establish(&mut s, t);
        assert_eq!(
            s.poll_timers(t + Duration::from_secs(3)),
            vec![Action::SendKeepalive]
        );
        assert!(s.poll_timers(t + Duration::from_secs(4)).is_empty());
        s.handle(
            t + Duration::from_secs(5),
            Event::Message(Message::Keepalive),
        );
        // Hold runs from the last message: 5 + 9 = 14.
        assert!(!s
            .poll_timers(t + Duration::from_secs(13))
            .iter()
            .any(|a| matches!(a, Action::Down(_))));
        let a = s.poll_timers(t + Duration::from_secs(14));
        assert!(
            a.contains(&Action::SendNotification(Notification::new(4, 0, vec![]))),
            "{a:?}"
        );
        assert_eq!(s.state, State::Idle);
    }

    #[test]
    fn wrong_as_is_bad_peer_as() {
        let t = Instant::now();
        let mut s = Session::new(cfg(), 1);
        s.handle(t, Event::Start);
        s.handle(t, Event::TcpConnected);
        let a = s.handle(t, Event::Message(open(65009, 30)));
        assert_eq!(
            a[0],
            Action::SendNotification(Notification::new(2, 2, 65009u16.to_be_bytes().to_vec()))
        );
        assert_eq!(s.state, State::Idle);
        // Restarts by itself after the backoff.
        assert_eq!(
            s.poll_timers(t + Duration::from_secs(3)),
            vec![Action::Connect]
        );
    }

    #[test]
    fn unexpected_messages_are_fsm_errors() {
        let t = Instant::now();
        let mut s = Session::new(cfg(), 1);
        s.handle(t, Event::Start);
        s.handle(t, Event::TcpConnected);
        let a = s.handle(t, Event::Message(Message::Keepalive));
        assert_eq!(
            a[0],
            Action::SendNotification(Notification::new(5, 1, vec![]))
        );
        let mut s = Session::new(cfg(), 1);
        establish(&mut s, t);
        let a = s.handle(t, Event::Message(open(65002, 30)));
        assert_eq!(
            a[0],
            Action::SendNotification(Notification::new(5, 3, vec![]))
        );
    }

    #[test]
    fn passive_waits_and_connect_retry() {
        let t = Instant::now();
        let mut s = Session::new(
            SessionConfig {
                passive: true,
                ..cfg()
            },
            1,
        );
        assert!(s.handle(t, Event::Start).is_empty());
        assert_eq!(s.state, State::Active);
        let mut s = Session::new(cfg(), 1);
        s.handle(t, Event::Start);
        s.handle(t, Event::TcpFailed);
        assert_eq!(s.state, State::Active);
        assert_eq!(
            s.poll_timers(t + Duration::from_secs(1)),
            vec![Action::Disconnect, Action::Connect]
        );
        assert_eq!(s.state, State::Connect);
    }

    #[test]
    fn connection_loss_and_stop() {
        let t = Instant::now();
        let mut s = Session::new(cfg(), 1);
        establish(&mut s, t);
        let a = s.handle(t, Event::TcpFailed);
        assert_eq!(
            a,
            vec![Action::Disconnect, Action::Down(DownReason::ConnectionLost)]
        );
        let mut s = Session::new(cfg(), 1);
        establish(&mut s, t);
        let cease = Notification::new(6, 2, vec![]);
        let a = s.handle(t, Event::Stop(cease.clone()));
        assert_eq!(
            a,
            vec![
                Action::SendNotification(cease),
                Action::Disconnect,
                Action::Down(DownReason::Stopped)
            ]
        );
        assert!(s.poll_timers(t + Duration::from_secs(600)).is_empty());
    }

    #[test]
    fn hold_zero_and_collision() {
        let t = Instant::now();
        let mut s = Session::new(
            SessionConfig {
                hold_time: 0,
                ..cfg()
            },
            1,
        );
        s.handle(t, Event::Start);
        s.handle(t, Event::TcpConnected);
        s.handle(t, Event::Message(open(65002, 30)));
        s.handle(t, Event::Message(Message::Keepalive));
        assert_eq!(s.next_deadline(), None);
        assert!(keep_outgoing(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 1)
        ));
        assert!(!keep_outgoing(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2)
        ));
    }
}
