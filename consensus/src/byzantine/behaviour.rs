//! The malicious behaviours, by name and parameters: what an operator (or a test)
//! selects with `--byzantine ID:BEHAVIOUR`.
//!
//! Syntax: `NAME[=PARAM]`, several joined with `+` to run them at once on one replica
//! (`equivocate+double-vote`). Names and parameters contain neither `,` nor `:`, so a
//! list `ID:BEHAVIOUR,ID:BEHAVIOUR` parses without quoting.

use std::fmt;
use std::str::FromStr;

/// How a forged quorum or timeout certificate is broken.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum CertDefect {
    /// One signer short of a quorum (every signature valid).
    TooFewSigners,
    /// Padded to a quorum by repeating a signer.
    DuplicateSigner,
    /// Padded to a quorum with a signer that is not a committee member.
    UnknownSigner,
    /// Padded to a quorum with a member's id over a signature it never made.
    InventedSignature,
}

impl CertDefect {
    pub const ALL: [CertDefect; 4] = [
        CertDefect::TooFewSigners,
        CertDefect::DuplicateSigner,
        CertDefect::UnknownSigner,
        CertDefect::InventedSignature,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CertDefect::TooFewSigners => "few",
            CertDefect::DuplicateSigner => "duplicate",
            CertDefect::UnknownSigner => "unknown",
            CertDefect::InventedSignature => "invented",
        }
    }

    fn parse(text: &str) -> Option<CertDefect> {
        CertDefect::ALL.into_iter().find(|d| d.name() == text)
    }
}

/// One malicious behaviour. Each is a transformation of what an honest core does (its
/// inputs and its [`Actions`](crate::Actions)), never a branch inside it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Behaviour {
    /// As leader, propose two different blocks for the round and send each to a
    /// different half of the other replicas; the first `overlap` replicas of the second
    /// half get both (so they can prove it; 0 hides it from every single replica).
    Equivocate { overlap: usize },
    /// Besides each vote, send a signed vote for another block in the same round.
    DoubleVote,
    /// Send nothing: a crashed-but-connected replica.
    Silent,
    /// Take part but never vote; with `to_positions = Some(k)`, vote only when the vote
    /// goes to a replica at committee position below `k`.
    WithholdVotes { to_positions: Option<usize> },
    /// Every signed message leaves with a signature that does not verify.
    BadSignature,
    /// Proposals and timeouts carry a quorum certificate with `defect` (all four in
    /// turn when `None`).
    ForgeQc { defect: Option<CertDefect> },
    /// Proposals and timeouts carry a forged timeout certificate for the round they
    /// speak about, so that receivers would skip ahead if they believed it.
    ForgeTc { defect: Option<CertDefect> },
    /// Whenever the honest core speaks, also replay two valid messages (own and
    /// others') at least `lag` rounds old.
    StaleReplay { lag: u64 },
    /// Send timeouts and proposals for rounds `by` rounds ahead, and near `u64::MAX`.
    RoundJump { by: u64 },
    /// As leader, claim a state digest that does not match execution.
    WrongStateDigest,
    /// Whenever the honest core speaks (a proposal, vote or timeout), also send
    /// `per_step` useless but valid messages to everyone (sync requests for unknown
    /// blocks, signed votes for unknown blocks).
    Flood { per_step: usize },
    /// As leader, send the proposal to only f+1 other replicas.
    SelectiveLeader,
}

impl Behaviour {
    /// Every behaviour with its default parameters, in the order.
    pub const ALL: [Behaviour; 12] = [
        Behaviour::Equivocate { overlap: 1 },
        Behaviour::DoubleVote,
        Behaviour::Silent,
        Behaviour::WithholdVotes { to_positions: None },
        Behaviour::BadSignature,
        Behaviour::ForgeQc { defect: None },
        Behaviour::ForgeTc { defect: None },
        Behaviour::StaleReplay { lag: 3 },
        Behaviour::RoundJump { by: 1_000_000 },
        Behaviour::WrongStateDigest,
        Behaviour::Flood { per_step: 4 },
        Behaviour::SelectiveLeader,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Behaviour::Equivocate { .. } => "equivocate",
            Behaviour::DoubleVote => "double-vote",
            Behaviour::Silent => "silent",
            Behaviour::WithholdVotes { .. } => "withhold-votes",
            Behaviour::BadSignature => "bad-signature",
            Behaviour::ForgeQc { .. } => "forge-qc",
            Behaviour::ForgeTc { .. } => "forge-tc",
            Behaviour::StaleReplay { .. } => "stale-replay",
            Behaviour::RoundJump { .. } => "round-jump",
            Behaviour::WrongStateDigest => "wrong-state-digest",
            Behaviour::Flood { .. } => "flood",
            Behaviour::SelectiveLeader => "selective-leader",
        }
    }

    /// Whether this behaviour signs two conflicting statements, so that honest
    /// replicas can hold evidence against it.
    pub fn equivocates(&self) -> bool {
        matches!(self, Behaviour::Equivocate { .. } | Behaviour::DoubleVote)
    }
}

impl fmt::Display for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        match self {
            Behaviour::Equivocate { overlap } if *overlap != 1 => write!(f, "={overlap}"),
            Behaviour::WithholdVotes { to_positions: Some(k) } => write!(f, "={k}"),
            Behaviour::ForgeQc { defect: Some(d) } | Behaviour::ForgeTc { defect: Some(d) } => {
                write!(f, "={}", d.name())
            }
            Behaviour::StaleReplay { lag } if *lag != 3 => write!(f, "={lag}"),
            Behaviour::RoundJump { by } if *by != 1_000_000 => write!(f, "={by}"),
            Behaviour::Flood { per_step } if *per_step != 4 => write!(f, "={per_step}"),
            _ => Ok(()),
        }
    }
}

/// Why a behaviour did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("unknown behaviour {0:?} (known: {known})", known = known_names())]
    UnknownBehaviour(String),
    #[error("behaviour {name} takes no parameter (got {param:?})")]
    UnexpectedParameter { name: &'static str, param: String },
    #[error("behaviour {name}: bad parameter {param:?} ({expected})")]
    BadParameter { name: &'static str, param: String, expected: &'static str },
    #[error("empty behaviour")]
    Empty,
    #[error("{0:?} is not ID:BEHAVIOUR")]
    NotAnAssignment(String),
}

fn known_names() -> String {
    Behaviour::ALL.iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
}

impl FromStr for Behaviour {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Behaviour, ParseError> {
        let (name, param) = match text.split_once('=') {
            Some((name, param)) => (name.trim(), Some(param.trim())),
            None => (text.trim(), None),
        };
        let default = Behaviour::ALL
            .into_iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| ParseError::UnknownBehaviour(name.to_string()))?;
        let Some(param) = param else { return Ok(default) };
        let number = |expected| {
            param.parse::<u64>().map_err(|_| ParseError::BadParameter {
                name: default.name(),
                param: param.to_string(),
                expected,
            })
        };
        let defect = || {
            CertDefect::parse(param).ok_or_else(|| ParseError::BadParameter {
                name: default.name(),
                param: param.to_string(),
                expected: "few, duplicate, unknown or invented",
            })
        };
        Ok(match default {
            Behaviour::Equivocate { .. } => {
                Behaviour::Equivocate { overlap: number("replicas that get both proposals")? as usize }
            }
            Behaviour::WithholdVotes { .. } => Behaviour::WithholdVotes {
                to_positions: Some(number("vote only to positions below this")? as usize),
            },
            Behaviour::ForgeQc { .. } => Behaviour::ForgeQc { defect: Some(defect()?) },
            Behaviour::ForgeTc { .. } => Behaviour::ForgeTc { defect: Some(defect()?) },
            Behaviour::StaleReplay { .. } => Behaviour::StaleReplay { lag: number("rounds")?.max(1) },
            Behaviour::RoundJump { .. } => Behaviour::RoundJump { by: number("rounds ahead")?.max(2) },
            Behaviour::Flood { .. } => Behaviour::Flood { per_step: number("messages per step")? as usize },
            other => {
                return Err(ParseError::UnexpectedParameter { name: other.name(), param: param.to_string() });
            }
        })
    }
}

/// Behaviours one replica runs at once, applied in order to each step's actions.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Behaviours(pub Vec<Behaviour>);

impl Behaviours {
    pub fn one(behaviour: Behaviour) -> Behaviours {
        Behaviours(vec![behaviour])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Behaviour> {
        self.0.iter()
    }

    pub fn equivocates(&self) -> bool {
        self.0.iter().any(Behaviour::equivocates)
    }
}

impl From<Behaviour> for Behaviours {
    fn from(behaviour: Behaviour) -> Behaviours {
        Behaviours::one(behaviour)
    }
}

impl fmt::Display for Behaviours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("+")?;
            }
            write!(f, "{b}")?;
        }
        Ok(())
    }
}

impl FromStr for Behaviours {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Behaviours, ParseError> {
        let list = text.split('+').map(str::parse).collect::<Result<Vec<Behaviour>, _>>()?;
        if list.is_empty() {
            return Err(ParseError::Empty);
        }
        Ok(Behaviours(list))
    }
}

/// Parses `ID:BEHAVIOUR[,ID:BEHAVIOUR]` (what `--byzantine` takes) into (id, behaviours).
pub fn parse_assignments(text: &str) -> Result<Vec<(u16, Behaviours)>, ParseError> {
    text.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            let (id, behaviours) =
                part.split_once(':').ok_or_else(|| ParseError::NotAnAssignment(part.to_string()))?;
            let id = id.trim().parse::<u16>().map_err(|_| ParseError::NotAnAssignment(part.to_string()))?;
            Ok((id, behaviours.parse()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips() {
        for b in Behaviour::ALL {
            assert_eq!(b.to_string().parse::<Behaviour>(), Ok(b));
        }
        for text in ["equivocate=0", "withhold-votes=2", "forge-qc=duplicate", "forge-tc=unknown", "flood=9"]
        {
            assert_eq!(text.parse::<Behaviour>().map(|b| b.to_string()).as_deref(), Ok(text));
        }
    }

    #[test]
    fn assignments_parse_and_errors_are_named() {
        let parsed = parse_assignments("1:equivocate,3:silent+flood=2").unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].0, 3);
        assert_eq!(parsed[1].1.to_string(), "silent+flood=2");
        assert!(matches!("explode".parse::<Behaviour>(), Err(ParseError::UnknownBehaviour(_))));
        assert!(matches!("silent=3".parse::<Behaviour>(), Err(ParseError::UnexpectedParameter { .. })));
        assert!(matches!("forge-qc=many".parse::<Behaviour>(), Err(ParseError::BadParameter { .. })));
        assert!(matches!(parse_assignments("equivocate"), Err(ParseError::NotAnAssignment(_))));
    }
}
