//! The account ledger: accounts owned by ed25519 keys, signed transfers, balances, no
//! overdrafts. A transfer is valid only if its owner's key signed it (domain `Transfer`,
//! this chain) with the account's next nonce; every replica checks the same way, so a
//! transfer signed by the wrong key is rejected identically everywhere. The signatures of
//! a block's transfers are checked together with one batch verification.

use bulwark_crypto::{ChainId, Digest, Domain, Hasher, KeyPair, PublicKey, Signature, codec};
use serde::{Deserialize, Serialize};

use super::{QueryError, Receipt, RestoreError, SnapshotJob, StateMachine, Transaction};

/// Balance a newly opened account starts with (the ledger's only issuance).
pub const OPENING_BALANCE: u64 = 1_000;

/// What a transfer's owner signs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub from: [u8; 32],
    pub to: [u8; 32],
    pub amount: u64,
    /// The sender account's next nonce: each signed transfer applies at most once.
    pub nonce: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerOp {
    /// Opens an account for `owner` with [`OPENING_BALANCE`] (no-op if it exists).
    Open {
        owner: [u8; 32],
    },
    Transfer {
        transfer: Transfer,
        signature: Signature,
    },
    Balance {
        owner: [u8; 32],
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerResult {
    Opened { balance: u64 },
    Transferred { from_balance: u64 },
    Balance(Option<u64>),
    Rejected(String),
}

impl LedgerOp {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self).unwrap_or_default()
    }

    /// A transfer signed by `key` for the ledger of `chain`.
    pub fn signed_transfer(
        key: &KeyPair,
        chain: ChainId,
        to: &PublicKey,
        amount: u64,
        nonce: u64,
    ) -> LedgerOp {
        let transfer = Transfer { from: key.public().to_bytes(), to: to.to_bytes(), amount, nonce };
        LedgerOp::Transfer { signature: key.sign(Domain::Transfer, chain, &transfer), transfer }
    }
}

impl LedgerResult {
    pub fn decode(bytes: &[u8]) -> Option<LedgerResult> {
        codec::decode(bytes, 4096).ok()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Account {
    balance: u64,
    next_nonce: u64,
}

pub struct Ledger {
    chain: ChainId,
    accounts: imbl::OrdMap<[u8; 32], Account>,
    digest: Digest,
}

impl Ledger {
    pub fn new(chain: ChainId) -> Ledger {
        Ledger { chain, accounts: imbl::OrdMap::new(), digest: Digest::ZERO }
    }

    /// Checks a transfer's signature alone (at admission, before ordering).
    pub fn check_signature(&self, transfer: &Transfer, signature: &Signature) -> bool {
        PublicKey::from_bytes(&transfer.from)
            .is_ok_and(|key| key.verify(Domain::Transfer, self.chain, transfer, signature).is_ok())
    }

    fn apply(&mut self, op: LedgerOp, signature_ok: bool) -> LedgerResult {
        match op {
            LedgerOp::Open { owner } => {
                if PublicKey::from_bytes(&owner).is_err() {
                    return LedgerResult::Rejected("owner is not an ed25519 public key".into());
                }
                let account =
                    self.accounts.entry(owner).or_insert(Account { balance: OPENING_BALANCE, next_nonce: 0 });
                LedgerResult::Opened { balance: account.balance }
            }
            LedgerOp::Balance { owner } => {
                LedgerResult::Balance(self.accounts.get(&owner).map(|a| a.balance))
            }
            LedgerOp::Transfer { transfer, .. } => {
                if !signature_ok {
                    return LedgerResult::Rejected("signature does not verify for the sender's key".into());
                }
                let Some(from) = self.accounts.get(&transfer.from) else {
                    return LedgerResult::Rejected("unknown sender account".into());
                };
                if !self.accounts.contains_key(&transfer.to) {
                    return LedgerResult::Rejected("unknown recipient account".into());
                }
                if transfer.nonce != from.next_nonce {
                    return LedgerResult::Rejected(format!(
                        "nonce {} is not the next ({})",
                        transfer.nonce, from.next_nonce
                    ));
                }
                if transfer.amount > from.balance {
                    return LedgerResult::Rejected(format!(
                        "insufficient funds: {} < {}",
                        from.balance, transfer.amount
                    ));
                }
                let from_balance = from.balance - transfer.amount;
                self.accounts
                    .insert(transfer.from, Account { balance: from_balance, next_nonce: transfer.nonce + 1 });
                if let Some(to) = self.accounts.get_mut(&transfer.to) {
                    to.balance += transfer.amount;
                }
                LedgerResult::Transferred { from_balance }
            }
        }
    }

    /// Sum of all balances (conserved by transfers).
    pub fn total_supply(&self) -> u128 {
        self.accounts.values().map(|a| u128::from(a.balance)).sum()
    }

    /// Whether each op's signature verifies: one batch for the block's transfers, and
    /// only if the batch fails, one by one (so the outcome is the same as checking each).
    fn verify_block(&self, ops: &[Option<LedgerOp>]) -> Vec<bool> {
        let transfers: Vec<(usize, &Transfer, &Signature)> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| match op {
                Some(LedgerOp::Transfer { transfer, signature }) => Some((i, transfer, signature)),
                _ => None,
            })
            .collect();
        let mut ok = vec![true; ops.len()];
        let keys: Option<Vec<PublicKey>> =
            transfers.iter().map(|(_, t, _)| PublicKey::from_bytes(&t.from).ok()).collect();
        let batch_ok = keys.is_some_and(|keys| {
            let messages: Vec<Vec<u8>> = transfers
                .iter()
                .map(|(_, t, _)| bulwark_crypto::signing_bytes(Domain::Transfer, self.chain, t))
                .collect();
            PublicKey::verify_batch_raw(
                &keys,
                &messages,
                &transfers.iter().map(|(_, _, s)| **s).collect::<Vec<_>>(),
            )
        });
        if !batch_ok {
            for (i, transfer, signature) in &transfers {
                ok[*i] = self.check_signature(transfer, signature);
            }
        }
        ok
    }
}

impl StateMachine for Ledger {
    fn execute(&mut self, height: u64, txs: &[Transaction]) -> Vec<Receipt> {
        let ops: Vec<Option<LedgerOp>> = txs.iter().map(|tx| codec::decode(&tx.op, 4096).ok()).collect();
        let signatures_ok = self.verify_block(&ops);
        let mut hasher = Hasher::new();
        hasher.update(self.digest.as_bytes()).update(&height.to_le_bytes());
        let receipts = ops
            .into_iter()
            .zip(signatures_ok)
            .zip(txs)
            .map(|((op, signature_ok), tx)| {
                let result = match op {
                    Some(op) => self.apply(op, signature_ok),
                    None => LedgerResult::Rejected("malformed operation".into()),
                };
                let bytes = codec::encode(&result).unwrap_or_default();
                hasher.update(&tx.op).update(&bytes);
                Receipt(bytes)
            })
            .collect();
        self.digest = hasher.finalize();
        receipts
    }

    fn query(&self, request: &[u8]) -> Result<Vec<u8>, QueryError> {
        match codec::decode::<LedgerOp>(request, 4096) {
            Ok(LedgerOp::Balance { owner }) => {
                Ok(codec::encode(&LedgerResult::Balance(self.accounts.get(&owner).map(|a| a.balance)))
                    .unwrap_or_default())
            }
            Ok(_) => Err(QueryError::Malformed("only balances can be read locally".into())),
            Err(e) => Err(QueryError::Malformed(e.to_string())),
        }
    }

    fn admit(&self, op: &[u8]) -> Result<(), String> {
        match codec::decode::<LedgerOp>(op, 4096) {
            Ok(LedgerOp::Transfer { transfer, signature })
                if !self.check_signature(&transfer, &signature) =>
            {
                Err("transfer signature does not verify for the sender's key".into())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(format!("malformed ledger operation: {e}")),
        }
    }

    fn state_digest(&self) -> Digest {
        self.digest
    }

    fn snapshot(&self) -> SnapshotJob {
        let (digest, accounts) = (self.digest, self.accounts.clone());
        Box::new(move || codec::encode(&(&digest, &accounts)).unwrap_or_default())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        let (digest, accounts) = codec::decode_large(snapshot, super::MAX_SNAPSHOT_BYTES)
            .map_err(|e| RestoreError::Malformed(e.to_string()))?;
        self.digest = digest;
        self.accounts = accounts;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(seq: u64, op: &LedgerOp) -> Transaction {
        Transaction { client: 1, sequence: seq, op: op.encode().into() }
    }

    #[test]
    fn transfers_conserve_supply_and_refuse_overdrafts_replays_and_wrong_keys() {
        let chain = ChainId::from_name("ledger");
        let (alice, bob, mallory) = (KeyPair::generate(), KeyPair::generate(), KeyPair::generate());
        let ops = [
            LedgerOp::Open { owner: alice.public().to_bytes() },
            LedgerOp::Open { owner: bob.public().to_bytes() },
            LedgerOp::signed_transfer(&alice, chain, &bob.public(), 300, 0),
            LedgerOp::signed_transfer(&alice, chain, &bob.public(), 300, 0), // replay
            LedgerOp::signed_transfer(&alice, chain, &bob.public(), 5_000, 1), // overdraft
        ];
        // Signed by mallory, claiming to be alice.
        let LedgerOp::Transfer { transfer, .. } =
            LedgerOp::signed_transfer(&alice, chain, &bob.public(), 10, 1)
        else {
            unreachable!()
        };
        let forged =
            LedgerOp::Transfer { transfer, signature: mallory.sign(Domain::Transfer, chain, &transfer) };
        let mut txs: Vec<Transaction> = ops.iter().enumerate().map(|(i, op)| tx(i as u64, op)).collect();
        txs.push(tx(9, &forged));
        let (mut a, mut b) = (Ledger::new(chain), Ledger::new(chain));
        let receipts = a.execute(1, &txs);
        assert_eq!(receipts, b.execute(1, &txs), "deterministic");
        assert_eq!(a.state_digest(), b.state_digest());
        let results: Vec<LedgerResult> =
            receipts.iter().map(|r| LedgerResult::decode(&r.0).unwrap()).collect();
        assert_eq!(results[2], LedgerResult::Transferred { from_balance: 700 });
        assert!(matches!(results[3], LedgerResult::Rejected(_)), "replayed nonce");
        assert!(matches!(results[4], LedgerResult::Rejected(_)), "overdraft");
        assert!(matches!(results[5], LedgerResult::Rejected(_)), "wrong key");
        assert_eq!(a.total_supply(), 2 * u128::from(OPENING_BALANCE));
        assert!(a.admit(&forged.encode()).is_err(), "refused before ordering");
        assert!(a.admit(&ops[2].encode()).is_ok());
        let mut c = Ledger::new(chain);
        c.restore(&(a.snapshot())()).unwrap();
        assert_eq!(c.total_supply(), a.total_supply());
    }
}
