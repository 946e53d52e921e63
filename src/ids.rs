//! User and room identifiers.
//!
//! Both are 64-bit numbers shown to clients as 16 lowercase hex digits. They
//! are chosen so that a future scale-out can place rooms and users on nodes by
//! hashing the id alone, with no lookup service:
//! - a user id is random;
//! - a direct room's id is derived from its two members (the same pair always
//!   gives the same room, whoever creates it), with the top bit clear;
//! - a group's id is random with the top bit set.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

const GROUP_BIT: u64 = 1 << 63;

#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct UserId(pub u64);

#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct RoomId(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadId;

fn parse_hex16(s: &str) -> Result<u64, BadId> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(BadId);
    }
    u64::from_str_radix(s, 16).map_err(|_| BadId)
}

impl UserId {
    pub fn random() -> UserId {
        loop {
            let v: u64 = rand::random();
            if v != 0 {
                return UserId(v);
            }
        }
    }
}

impl RoomId {
    /// The one direct room of two users, independent of their order.
    pub fn direct(a: UserId, b: UserId) -> RoomId {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mut h = Sha256::new();
        h.update(b"confab/direct/");
        h.update(lo.0.to_be_bytes());
        h.update(hi.0.to_be_bytes());
        let d = h.finalize();
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(&d[..8]);
        RoomId((u64::from_be_bytes(b8) & !GROUP_BIT).max(1))
    }

    pub fn new_group() -> RoomId {
        RoomId(rand::random::<u64>() | GROUP_BIT)
    }

    pub fn is_direct(self) -> bool {
        self.0 & GROUP_BIT == 0
    }
}

macro_rules! hex_id {
    ($t:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:016x}", self.0)
            }
        }
        impl FromStr for $t {
            type Err = BadId;
            fn from_str(s: &str) -> Result<Self, BadId> {
                parse_hex16(s).map($t)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(|_| serde::de::Error::custom("bad id"))
            }
        }
    };
}
hex_id!(UserId);
hex_id!(RoomId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_room_is_symmetric_and_not_a_group() {
        let (a, b) = (UserId(7), UserId(99));
        assert_eq!(RoomId::direct(a, b), RoomId::direct(b, a));
        assert!(RoomId::direct(a, b).is_direct());
        assert!(!RoomId::new_group().is_direct());
    }

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let id = UserId(0xdead_beef);
        assert_eq!(id.to_string(), "00000000deadbeef");
        assert_eq!("00000000deadbeef".parse::<UserId>(), Ok(id));
        for bad in [
            "",
            "xyz",
            "00000000deadbee",
            "00000000deadbeeff",
            "+0000000deadbeef",
        ] {
            assert!(bad.parse::<UserId>().is_err(), "{bad}");
        }
    }
}
