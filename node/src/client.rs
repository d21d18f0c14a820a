//! The client library: submits requests to every replica and accepts a result only
//! when f+1 replicas (at least one honest) report the same one.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use bulwark_consensus::Height;
use bulwark_crypto::{Committee, KeyPair, ReplicaId};
use bulwark_network::{ClientConnection, NetworkConfig};
use tokio::sync::mpsc;

use crate::wire::{Outcome, Rejection, Reply, Request, RequestKind, client_id_of};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not connect to enough replicas: {connected} connected, need {needed}")]
    NotEnoughReplicas { connected: usize, needed: usize },
    #[error("no f+1 matching replies within {0:?}")]
    Timeout(Duration),
    #[error("rejected by f+1 replicas: {0}")]
    Rejected(Rejection),
    #[error("replica {0} is not connected")]
    UnknownReplica(ReplicaId),
}

/// A result that f+1 replicas agreed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certified {
    pub sequence: u64,
    pub height: Height,
    pub result: Vec<u8>,
    /// The replicas whose replies matched.
    pub replicas: Vec<ReplicaId>,
}

/// A client of one committee.
pub struct Client {
    id: u64,
    next_sequence: u64,
    needed: usize,
    senders: BTreeMap<ReplicaId, mpsc::Sender<Request>>,
    replies: mpsc::Receiver<Reply>,
    /// Replies so far per sequence: (height, outcome) -> replicas.
    tally: HashMap<u64, BTreeMap<(Height, Outcome), BTreeSet<ReplicaId>>>,
    /// Sequences already certified: later replies for them are ignored.
    certified: HashSet<u64>,
    pub timeout: Duration,
}

impl Client {
    /// Connects to the replicas' client endpoints. With a key, the client id is bound
    /// to it and replicas refuse requests that claim another id.
    pub async fn connect(
        committee: &Committee,
        endpoints: &[(ReplicaId, SocketAddr)],
        key: Option<&KeyPair>,
        config: NetworkConfig,
    ) -> Result<Client, ClientError> {
        let needed = committee.validity_threshold();
        let id = match key {
            Some(k) => client_id_of(&k.public()),
            None => rand::random(),
        };
        let (reply_tx, replies) = mpsc::channel(65_536);
        let mut senders = BTreeMap::new();
        for (replica, address) in endpoints {
            let Ok(mut connection) = ClientConnection::<Request, Reply>::connect(
                config.clone(),
                committee,
                *replica,
                *address,
                key,
            )
            .await
            else {
                continue;
            };
            let (tx, mut rx) = mpsc::channel::<Request>(65_536);
            let reply_tx = reply_tx.clone();
            let replica = *replica;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        request = rx.recv() => match request {
                            Some(request) => if connection.send(&request).await.is_err() { break },
                            None => break,
                        },
                        reply = connection.recv() => match reply {
                            // A replica can only speak for itself.
                            Ok(reply) if reply.replica == replica => { let _ = reply_tx.send(reply).await; }
                            Ok(_) => {}
                            Err(_) => break,
                        },
                    }
                }
                connection.close().await;
            });
            senders.insert(replica, tx);
        }
        if senders.len() < needed {
            return Err(ClientError::NotEnoughReplicas { connected: senders.len(), needed });
        }
        Ok(Client {
            id,
            next_sequence: 1,
            needed,
            senders,
            replies,
            tally: HashMap::new(),
            certified: HashSet::new(),
            timeout: Duration::from_secs(10),
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sends an ordered request to every replica without waiting; returns its sequence.
    pub async fn submit(&mut self, op: Vec<u8>) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let request = Request { client: self.id, sequence, kind: RequestKind::Ordered, op };
        self.send_all(&request).await;
        sequence
    }

    async fn send_all(&self, request: &Request) {
        for sender in self.senders.values() {
            let _ = sender.send(request.clone()).await;
        }
    }

    /// The next request (of those submitted) to gather f+1 matching replies.
    pub async fn next_certified(&mut self) -> Result<Result<Certified, Rejection>, ClientError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let reply = tokio::time::timeout_at(deadline, self.replies.recv())
                .await
                .map_err(|_| ClientError::Timeout(self.timeout))?
                .ok_or(ClientError::NotEnoughReplicas { connected: 0, needed: self.needed })?;
            if let Some(done) = self.count(reply) {
                return Ok(done);
            }
        }
    }

    fn count(&mut self, reply: Reply) -> Option<Result<Certified, Rejection>> {
        if matches!(reply.outcome, Outcome::Read(_))
            || reply.client != self.id
            || self.certified.contains(&reply.sequence)
        {
            return None;
        }
        // Rejections may differ in the height they report: match on the outcome only.
        let height = if matches!(reply.outcome, Outcome::Rejected(_)) { Height(0) } else { reply.height };
        let entry = self.tally.entry(reply.sequence).or_default();
        let voters = entry.entry((height, reply.outcome.clone())).or_default();
        voters.insert(reply.replica);
        if voters.len() < self.needed {
            return None;
        }
        let replicas: Vec<ReplicaId> = voters.iter().copied().collect();
        self.tally.remove(&reply.sequence);
        self.certified.insert(reply.sequence);
        Some(match reply.outcome {
            Outcome::Executed(result) => Ok(Certified { sequence: reply.sequence, height, result, replicas }),
            Outcome::Rejected(rejection) => Err(rejection),
            Outcome::Read(_) => return None,
        })
    }

    /// Executes `op` through consensus and returns the result f+1 replicas agree on.
    /// Retries (same sequence, so at most once) until the client's timeout.
    pub async fn execute(&mut self, op: Vec<u8>) -> Result<Certified, ClientError> {
        let sequence = self.submit(op.clone()).await;
        let request = Request { client: self.id, sequence, kind: RequestKind::Ordered, op };
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut retry = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let reply = tokio::select! {
                reply = self.replies.recv() => reply.ok_or(ClientError::NotEnoughReplicas { connected: 0, needed: self.needed })?,
                _ = tokio::time::sleep_until(retry) => {
                    self.send_all(&request).await;
                    retry += Duration::from_secs(2);
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => return Err(ClientError::Timeout(self.timeout)),
            };
            if reply.sequence != sequence {
                continue;
            }
            if let Some(done) = self.count(reply) {
                return done.map_err(ClientError::Rejected);
            }
        }
    }

    /// Reads from one replica's committed state (not linearizable; marked with the
    /// height it reflects).
    pub async fn read_local(
        &mut self,
        replica: ReplicaId,
        op: Vec<u8>,
    ) -> Result<(Height, Vec<u8>), ClientError> {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let sender = self.senders.get(&replica).ok_or(ClientError::UnknownReplica(replica))?;
        let request = Request { client: self.id, sequence, kind: RequestKind::LocalRead, op };
        let _ = sender.send(request).await;
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let reply = tokio::time::timeout_at(deadline, self.replies.recv())
                .await
                .map_err(|_| ClientError::Timeout(self.timeout))?
                .ok_or(ClientError::UnknownReplica(replica))?;
            if reply.sequence == sequence && reply.replica == replica {
                return match reply.outcome {
                    Outcome::Read(result) => Ok((reply.height, result)),
                    Outcome::Rejected(r) => Err(ClientError::Rejected(r)),
                    Outcome::Executed(_) => Err(ClientError::Timeout(self.timeout)),
                };
            }
        }
    }
}
