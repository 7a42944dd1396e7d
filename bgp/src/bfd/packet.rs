// BFD Control packets (RFC 5880 §4.1), without authentication: Sepal sends none, and a packet
// with the A bit is refused (§6.8.6: no authentication is in use on its sessions).

use std::time::Duration;

/// Session states as carried in the Sta field (RFC 5880 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    fn from_bits(b: u8) -> State {
        match b & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }
}

/// Diagnostic codes (RFC 5880 §4.1): why the session last left Up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Diag {
    None,
    /// 1: the peer's packets stopped for the detection time.
    ControlDetectionTimeExpired,
    EchoFunctionFailed,
    /// 3: the peer said it went down.
    NeighborSignaledDown,
    ForwardingPlaneReset,
    PathDown,
    ConcatenatedPathDown,
    AdministrativelyDown,
    ReverseConcatenatedPathDown,
    /// Codes 9-31, reserved.
    Other(u8),
}

impl Diag {
    pub fn code(self) -> u8 {
        match self {
            Diag::None => 0,
            Diag::ControlDetectionTimeExpired => 1,
            Diag::EchoFunctionFailed => 2,
            Diag::NeighborSignaledDown => 3,
            Diag::ForwardingPlaneReset => 4,
            Diag::PathDown => 5,
            Diag::ConcatenatedPathDown => 6,
            Diag::AdministrativelyDown => 7,
            Diag::ReverseConcatenatedPathDown => 8,
            Diag::Other(c) => c & 0x1f,
        }
    }

    fn from_code(c: u8) -> Diag {
        match c & 0x1f {
            0 => Diag::None,
            1 => Diag::ControlDetectionTimeExpired,
            2 => Diag::EchoFunctionFailed,
            3 => Diag::NeighborSignaledDown,
            4 => Diag::ForwardingPlaneReset,
            5 => Diag::PathDown,
            6 => Diag::ConcatenatedPathDown,
            7 => Diag::AdministrativelyDown,
            8 => Diag::ReverseConcatenatedPathDown,
            c => Diag::Other(c),
        }
    }
}

/// One Control packet. Intervals are in microseconds on the wire and `Duration`s here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub diag: Diag,
    pub state: State,
    pub poll: bool,
    pub final_: bool,
    /// C: the sender's BFD does not share fate with its control plane.
    pub control_plane_independent: bool,
    pub demand: bool,
    pub detect_mult: u8,
    pub my_discriminator: u32,
    pub your_discriminator: u32,
    pub desired_min_tx: Duration,
    pub required_min_rx: Duration,
    pub required_min_echo_rx: Duration,
}

/// Length of a Control packet without authentication.
pub const LEN: usize = 24;

/// Why a received packet was discarded (RFC 5880 §6.8.6, in its order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Discard {
    #[error("shorter than a BFD Control packet")]
    Short,
    #[error("version {0}, not 1")]
    Version(u8),
    #[error("length field {0} is below 24 or beyond the datagram")]
    Length(u8),
    #[error("authentication present, none configured")]
    Authenticated,
    #[error("detect multiplier 0")]
    DetectMult,
    #[error("multipoint bit set")]
    Multipoint,
    #[error("my discriminator 0")]
    MyDiscriminator,
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

impl Packet {
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0] = (1 << 5) | self.diag.code();
        b[1] = ((self.state as u8) << 6)
            | (u8::from(self.poll) << 5)
            | (u8::from(self.final_) << 4)
            | (u8::from(self.control_plane_independent) << 3)
            | (u8::from(self.demand) << 1);
        b[2] = self.detect_mult;
        b[3] = LEN as u8;
        b[4..8].copy_from_slice(&self.my_discriminator.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_discriminator.to_be_bytes());
        b[12..16].copy_from_slice(&micros(self.desired_min_tx).to_be_bytes());
        b[16..20].copy_from_slice(&micros(self.required_min_rx).to_be_bytes());
        b[20..24].copy_from_slice(&micros(self.required_min_echo_rx).to_be_bytes());
        b
    }

    /// Decodes and applies the checks of RFC 5880 §6.8.6 that need no session.
    pub fn decode(b: &[u8]) -> Result<Packet, Discard> {
        if b.len() < LEN {
            return Err(Discard::Short);
        }
        let version = b[0] >> 5;
        if version != 1 {
            return Err(Discard::Version(version));
        }
        let len = b[3];
        let auth = b[1] & 0x04 != 0;
        if usize::from(len) < LEN || usize::from(len) > b.len() {
            return Err(Discard::Length(len));
        }
        if auth {
            return Err(Discard::Authenticated);
        }
        if b[2] == 0 {
            return Err(Discard::DetectMult);
        }
        if b[1] & 0x01 != 0 {
            return Err(Discard::Multipoint);
        }
        let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let my = word(4);
        if my == 0 {
            return Err(Discard::MyDiscriminator);
        }
        let us = |i: usize| Duration::from_micros(u64::from(word(i)));
        Ok(Packet {
            diag: Diag::from_code(b[0]),
            state: State::from_bits(b[1] >> 6),
            poll: b[1] & 0x20 != 0,
            final_: b[1] & 0x10 != 0,
            control_plane_independent: b[1] & 0x08 != 0,
            demand: b[1] & 0x02 != 0,
            detect_mult: b[2],
            my_discriminator: my,
            your_discriminator: word(8),
            desired_min_tx: us(12),
            required_min_rx: us(16),
            required_min_echo_rx: us(20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Packet {
        Packet {
            diag: Diag::NeighborSignaledDown,
            state: State::Init,
            poll: true,
            final_: false,
            control_plane_independent: true,
            demand: false,
            detect_mult: 3,
            my_discriminator: 0x01020304,
            your_discriminator: 7,
            desired_min_tx: Duration::from_millis(300),
            required_min_rx: Duration::from_millis(250),
            required_min_echo_rx: Duration::ZERO,
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let p = sample();
        let b = p.encode();
        // Version 1, diag 3; Init (2) with P and C; length 24; 300 ms = 300000 µs.
        assert_eq!(&b[..4], &[0x23, 0x80 | 0x20 | 0x08, 3, 24]);
        assert_eq!(&b[12..16], &300_000u32.to_be_bytes());
        assert_eq!(Packet::decode(&b), Ok(p));
    }

    #[test]
    fn discards_in_rfc_order() {
        let good = sample().encode();
        assert_eq!(Packet::decode(&good[..20]), Err(Discard::Short));
        let mut b = good;
        b[0] = 0x43;
        assert_eq!(Packet::decode(&b), Err(Discard::Version(2)));
        let mut b = good;
        b[3] = 30;
        assert_eq!(Packet::decode(&b), Err(Discard::Length(30)));
        let mut b = good;
        b[1] |= 0x04;
        assert_eq!(Packet::decode(&b), Err(Discard::Authenticated));
        let mut b = good;
        b[2] = 0;
        assert_eq!(Packet::decode(&b), Err(Discard::DetectMult));
        let mut b = good;
        b[1] |= 0x01;
        assert_eq!(Packet::decode(&b), Err(Discard::Multipoint));
        let mut b = good;
        b[4..8].copy_from_slice(&[0; 4]);
        assert_eq!(Packet::decode(&b), Err(Discard::MyDiscriminator));
        // Trailing bytes beyond the length field are ignored.
        let mut long = good.to_vec();
        long.extend_from_slice(&[0xff; 8]);
        assert_eq!(Packet::decode(&long), Ok(sample()));
    }
}
