// One BFD session in asynchronous mode (RFC 5880 §6): the state machine, the transmit interval
// with jitter, the detection time and poll sequences. Pure: packets and the time in, packets to
// send and state changes out; the UDP edge (RFC 5881) is the runner's.

use std::time::{Duration, Instant};

use super::packet::{Diag, Packet, State};

/// The intervals one end asks for (RFC 5880 §6.8.1 bfd.DesiredMinTxInterval,
/// bfd.RequiredMinRxInterval, bfd.DetectMult).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Timers {
    pub min_tx: Duration,
    pub min_rx: Duration,
    pub multiplier: u8,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            min_tx: Duration::from_millis(300),
            min_rx: Duration::from_millis(300),
            multiplier: 3,
        }
    }
}

/// What a session asks of its runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Send(Packet),
    Changed { from: State, to: State, diag: Diag },
}

/// A session's state as shown to operators.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub state: State,
    pub remote_state: State,
    /// The local diagnostic: why the session last went down.
    pub diag: Diag,
    pub remote_diag: Diag,
    pub local_discriminator: u32,
    pub remote_discriminator: u32,
    /// The interval this end transmits at (before jitter), and the detection time, in force now.
    pub tx_interval_ms: u64,
    pub detection_time_ms: u64,
    /// The C bit this end sends: BFD runs apart from the BGP it serves (RFC 5880 §4.1).
    pub control_plane_independent: bool,
    pub remote_control_plane_independent: bool,
}

/// Outside Up, no faster than one packet a second (RFC 5880 §6.8.3).
const SLOW_TX: Duration = Duration::from_secs(1);

pub struct Session {
    timers: Timers,
    /// Sent as the C bit.
    control_plane_independent: bool,
    state: State,
    remote_state: State,
    diag: Diag,
    remote_diag: Diag,
    local_discr: u32,
    remote_discr: u32,
    /// bfd.RemoteMinRxInterval: 1 µs until the peer says otherwise (§6.8.1).
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    remote_mult: u8,
    remote_cpi: bool,
    /// bfd.DesiredMinTxInterval as advertised.
    desired_tx: Duration,
    /// The values in force for our transmit interval and detection time: they trail the
    /// advertised ones through a poll sequence when they would slow us (or tighten the
    /// detection time) (§6.8.3).
    tx_in_force: Duration,
    rx_in_force: Duration,
    polling: bool,
    owe_final: bool,
    next_tx: Instant,
    detect_at: Option<Instant>,
    rng: u64,
}

impl Session {
    pub fn new(
        timers: Timers,
        control_plane_independent: bool,
        local_discr: u32,
        now: Instant,
        seed: u64,
    ) -> Session {
        let desired_tx = timers.min_tx.max(SLOW_TX);
        Session {
            timers,
            control_plane_independent,
            state: State::Down,
            remote_state: State::Down,
            diag: Diag::None,
            remote_diag: Diag::None,
            local_discr,
            remote_discr: 0,
            remote_min_rx: Duration::from_micros(1),
            remote_desired_tx: Duration::ZERO,
            remote_mult: 0,
            remote_cpi: false,
            desired_tx,
            tx_in_force: desired_tx,
            rx_in_force: timers.min_rx,
            polling: false,
            owe_final: false,
            next_tx: now,
            detect_at: None,
            rng: seed | 1,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// When `on_timer` must next be called.
    pub fn deadline(&self) -> Instant {
        self.detect_at.map_or(self.next_tx, |d| d.min(self.next_tx))
    }

    /// The detection time (§6.8.4): the peer's multiplier times the slower of what we can
    /// receive and what it sends at.
    fn detection_time(&self) -> Duration {
        self.rx_in_force.max(self.remote_desired_tx) * u32::from(self.remote_mult)
    }

    fn tx_interval(&self) -> Duration {
        self.tx_in_force.max(self.remote_min_rx)
    }

    fn jittered(&mut self, d: Duration) -> Duration {
        // xorshift64: deterministic per seed, good enough to spread transmissions.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        // 75-100 % of the interval, 75-90 % with a multiplier of 1 (§6.8.7).
        let span = if self.timers.multiplier == 1 { 15 } else { 25 };
        let pct = 75 + (self.rng % (span + 1)) as u32;
        d * pct / 100
    }

    fn packet(&self, final_: bool) -> Packet {
        Packet {
            diag: self.diag,
            state: self.state,
            // Never P and F in one packet (§6.5).
            poll: self.polling && !final_,
            final_,
            control_plane_independent: self.control_plane_independent,
            demand: false,
            detect_mult: self.timers.multiplier,
            my_discriminator: self.local_discr,
            your_discriminator: self.remote_discr,
            desired_min_tx: self.desired_tx,
            required_min_rx: self.timers.min_rx,
            required_min_echo_rx: Duration::ZERO,
        }
    }

    /// Sends now (a state change, a Final) and restarts the periodic transmission from here.
    fn send_now(&mut self, final_: bool, now: Instant, out: &mut Vec<Output>) {
        if self.remote_min_rx.is_zero() && !final_ {
            return;
        }
        out.push(Output::Send(self.packet(final_)));
        let i = self.tx_interval();
        self.next_tx = now + self.jittered(i);
    }

    fn change(&mut self, to: State, diag: Diag, now: Instant, out: &mut Vec<Output>) {
        let from = self.state;
        if from == to {
            return;
        }
        self.state = to;
        self.diag = diag;
        let desired = if to == State::Up {
            self.timers.min_tx
        } else {
            self.timers.min_tx.max(SLOW_TX)
        };
        if desired != self.desired_tx {
            self.desired_tx = desired;
            if to == State::Up {
                // Faster now: a poll sequence tells the peer (§6.8.3); speeding up needs no wait.
                self.polling = true;
            }
            self.tx_in_force = desired;
        }
        out.push(Output::Changed { from, to, diag });
        self.send_now(false, now, out);
    }

    /// A packet for this session (the runner has matched the discriminator or the address).
    pub fn receive(&mut self, p: &Packet, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if p.your_discriminator == 0 && !matches!(p.state, State::Down | State::AdminDown) {
            return out;
        }
        if p.your_discriminator != 0 && p.your_discriminator != self.local_discr {
            return out;
        }
        self.remote_discr = p.my_discriminator;
        self.remote_state = p.state;
        self.remote_diag = p.diag;
        self.remote_min_rx = p.required_min_rx;
        self.remote_desired_tx = p.desired_min_tx;
        self.remote_mult = p.detect_mult;
        self.remote_cpi = p.control_plane_independent;
        if p.final_ && self.polling {
            self.polling = false;
            self.tx_in_force = self.desired_tx;
            self.rx_in_force = self.timers.min_rx;
        }
        self.detect_at = Some(now + self.detection_time());
        if self.state == State::AdminDown {
            return out;
        }
        match (self.state, p.state) {
            (State::Down, State::AdminDown) => {}
            (_, State::AdminDown) => {
                self.change(State::Down, Diag::NeighborSignaledDown, now, &mut out)
            }
            (State::Down, State::Down) => self.change(State::Init, Diag::None, now, &mut out),
            (State::Down, State::Init) => self.change(State::Up, Diag::None, now, &mut out),
            (State::Init, State::Init | State::Up) => {
                self.change(State::Up, Diag::None, now, &mut out)
            }
            (State::Up, State::Down) => {
                self.change(State::Down, Diag::NeighborSignaledDown, now, &mut out)
            }
            _ => {}
        }
        if p.poll {
            self.owe_final = true;
        }
        if self.owe_final {
            self.owe_final = false;
            self.send_now(true, now, &mut out);
        }
        out
    }

    /// Timers: the detection time running out, and periodic transmission.
    pub fn on_timer(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.detect_at.is_some_and(|d| d <= now) {
            self.detect_at = None;
            // §6.8.1: the peer's discriminator is forgotten with it.
            self.remote_discr = 0;
            self.remote_state = State::Down;
            if matches!(self.state, State::Init | State::Up) {
                self.change(
                    State::Down,
                    Diag::ControlDetectionTimeExpired,
                    now,
                    &mut out,
                );
            }
        }
        if self.next_tx <= now {
            if self.remote_min_rx.is_zero() {
                // The peer asked for no packets (§6.8.7); look again after a while.
                self.next_tx = now + SLOW_TX;
            } else {
                self.send_now(false, now, &mut out);
            }
        }
        out
    }

    /// New configured intervals. While Up a change is announced with a poll sequence, and one
    /// that slows transmission or shortens the detection time takes effect once it ends.
    pub fn set_timers(&mut self, timers: Timers, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if timers == self.timers {
            return out;
        }
        self.timers = timers;
        let desired = if self.state == State::Up {
            timers.min_tx
        } else {
            timers.min_tx.max(SLOW_TX)
        };
        if self.state == State::Up {
            self.polling = true;
            if desired < self.tx_in_force {
                self.tx_in_force = desired;
            }
            if timers.min_rx > self.rx_in_force {
                self.rx_in_force = timers.min_rx;
            }
        } else {
            self.tx_in_force = desired;
            self.rx_in_force = timers.min_rx;
        }
        self.desired_tx = desired;
        self.send_now(false, now, &mut out);
        out
    }

    /// Takes the session administratively down (the peer is told, Diag 7) or back to Down.
    pub fn set_admin_down(&mut self, down: bool, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        match (down, self.state) {
            (true, State::AdminDown) | (false, State::Down | State::Init | State::Up) => {}
            (true, _) => self.change(State::AdminDown, Diag::AdministrativelyDown, now, &mut out),
            (false, State::AdminDown) => self.change(State::Down, Diag::None, now, &mut out),
        }
        out
    }

    pub fn status(&self) -> Status {
        Status {
            state: self.state,
            remote_state: self.remote_state,
            diag: self.diag,
            remote_diag: self.remote_diag,
            local_discriminator: self.local_discr,
            remote_discriminator: self.remote_discr,
            tx_interval_ms: self.tx_interval().as_millis() as u64,
            detection_time_ms: self.detection_time().as_millis() as u64,
            control_plane_independent: self.control_plane_independent,
            remote_control_plane_independent: self.remote_cpi,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sessions wired back to back with instant delivery, on a simulated clock.
    struct Pair {
        a: Session,
        b: Session,
        now: Instant,
        /// Deliver a's packets to b, and b's to a.
        a_to_b: bool,
        b_to_a: bool,
        changes: Vec<(char, Duration, State, Diag)>,
        start: Instant,
        sent_by_a: Vec<(Duration, Packet)>,
    }

    impl Pair {
        fn new(ta: Timers, tb: Timers) -> Pair {
            let now = Instant::now();
            Pair {
                a: Session::new(ta, false, 1, now, 7),
                b: Session::new(tb, true, 2, now, 11),
                now,
                a_to_b: true,
                b_to_a: true,
                changes: Vec::new(),
                start: now,
                sent_by_a: Vec::new(),
            }
        }

        fn handle(&mut self, from: char, outs: Vec<Output>) {
            for o in outs {
                match o {
                    Output::Changed { to, diag, .. } => {
                        self.changes.push((from, self.now - self.start, to, diag));
                    }
                    Output::Send(p) => {
                        let (deliver, next) = if from == 'a' {
                            self.sent_by_a.push((self.now - self.start, p.clone()));
                            (self.a_to_b, 'b')
                        } else {
                            (self.b_to_a, 'a')
                        };
                        if deliver {
                            let outs = if next == 'a' {
                                self.a.receive(&p, self.now)
                            } else {
                                self.b.receive(&p, self.now)
                            };
                            self.handle(next, outs);
                        }
                    }
                }
            }
        }

        /// Runs the clock forward by `d`.
        fn run(&mut self, d: Duration) {
            let until = self.now + d;
            loop {
                let t = self.a.deadline().min(self.b.deadline());
                if t > until {
                    self.now = until;
                    return;
                }
                self.now = self.now.max(t);
                let oa = self.a.on_timer(self.now);
                self.handle('a', oa);
                let ob = self.b.on_timer(self.now);
                self.handle('b', ob);
            }
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn three_way_handshake_then_fast_timers_after_a_poll() {
        let mut p = Pair::new(Timers::default(), Timers::default());
        p.run(ms(50));
        assert_eq!(p.a.state(), State::Up);
        assert_eq!(p.b.state(), State::Up);
        // Down -> Init -> Up on one side, Down -> Up on the other.
        let a_states: Vec<State> = p
            .changes
            .iter()
            .filter(|c| c.0 == 'a')
            .map(|c| c.2)
            .collect();
        assert!(a_states.ends_with(&[State::Up]), "{a_states:?}");
        // Before Up: at most one packet a second, advertised as 1 s (RFC 5880 §6.8.3).
        assert_eq!(p.sent_by_a[0].1.desired_min_tx, Duration::from_secs(1));
        p.run(ms(3000));
        let s = p.a.status();
        assert_eq!((s.tx_interval_ms, s.detection_time_ms), (300, 900));
        assert!(s.remote_control_plane_independent);
        // Once Up: packets 225-300 ms apart (jitter), the poll sequence over.
        let late: Vec<Duration> = p
            .sent_by_a
            .windows(2)
            .filter(|w| w[0].0 > ms(1000))
            .map(|w| w[1].0 - w[0].0)
            .collect();
        assert!(late.len() > 5);
        assert!(
            late.iter().all(|d| *d >= ms(225) && *d <= ms(300)),
            "{late:?}"
        );
        assert!(!p.sent_by_a.last().unwrap().1.poll);
    }

    #[test]
    fn silence_is_detected_within_the_detection_time() {
        let mut p = Pair::new(Timers::default(), Timers::default());
        p.run(ms(2000));
        assert_eq!(p.a.state(), State::Up);
        let cut = p.now - p.start;
        p.b_to_a = false;
        p.run(ms(2000));
        let down = p
            .changes
            .iter()
            .find(|c| c.0 == 'a' && c.2 == State::Down)
            .expect("a went down");
        assert_eq!(down.3, Diag::ControlDetectionTimeExpired);
        assert!(down.1 - cut <= ms(900), "detected after {:?}", down.1 - cut);
        // b hears a say Down and follows, with "neighbor signaled session down".
        let b_down = p
            .changes
            .iter()
            .find(|c| c.0 == 'b' && c.2 == State::Down)
            .expect("b went down");
        assert_eq!(b_down.3, Diag::NeighborSignaledDown);
        // Heard again: back Up.
        p.b_to_a = true;
        p.run(ms(3000));
        assert_eq!((p.a.state(), p.b.state()), (State::Up, State::Up));
    }

    #[test]
    fn admin_down_is_signalled_and_the_peer_stays_down() {
        let mut p = Pair::new(Timers::default(), Timers::default());
        p.run(ms(2000));
        let outs = p.b.set_admin_down(true, p.now);
        p.handle('b', outs);
        assert_eq!(p.a.state(), State::Down);
        assert_eq!(p.a.status().diag, Diag::NeighborSignaledDown);
        p.run(ms(3000));
        assert_eq!(
            p.a.state(),
            State::Down,
            "no Up while the peer is AdminDown"
        );
        let outs = p.b.set_admin_down(false, p.now);
        p.handle('b', outs);
        p.run(ms(3000));
        assert_eq!((p.a.state(), p.b.state()), (State::Up, State::Up));
    }

    #[test]
    fn poll_gets_a_final_at_once_and_slower_timers_wait_for_it() {
        let mut p = Pair::new(Timers::default(), Timers::default());
        p.run(ms(2000));
        // A poll from the peer is answered at once with F (and without P).
        let mut poll = p.b.packet(false);
        poll.poll = true;
        poll.your_discriminator = 1;
        let outs = p.a.receive(&poll, p.now);
        let Some(Output::Send(reply)) = outs.last() else {
            panic!("{outs:?}")
        };
        assert!(reply.final_ && !reply.poll);
        // Slower transmission is advertised at once, in force after the Final.
        p.a_to_b = false;
        let slower = Timers {
            min_tx: ms(1000),
            ..Timers::default()
        };
        let outs = p.a.set_timers(slower, p.now);
        let Some(Output::Send(first)) = outs.first() else {
            panic!("{outs:?}")
        };
        assert!(first.poll && first.desired_min_tx == ms(1000));
        assert_eq!(p.a.status().tx_interval_ms, 300);
        p.a_to_b = true;
        p.run(ms(1000));
        assert_eq!(p.a.status().tx_interval_ms, 1000);
        assert_eq!(p.b.status().detection_time_ms, 3000);
        assert_eq!(p.a.state(), State::Up);
    }

    #[test]
    fn a_packet_for_another_discriminator_or_an_unmatched_up_is_ignored() {
        let now = Instant::now();
        let mut s = Session::new(Timers::default(), false, 5, now, 1);
        let mut other = Session::new(Timers::default(), false, 6, now, 2).packet(false);
        other.your_discriminator = 99;
        assert!(s.receive(&other, now).is_empty());
        other.your_discriminator = 0;
        other.state = State::Up;
        assert!(s.receive(&other, now).is_empty());
        assert_eq!(s.state(), State::Down);
    }
}
