//! The client library: submits each request to one replica (its home replica), which
//! batches it for everyone, and accepts a result only when f+1 replicas (at least one
//! honest) report the same one. Every replica answers every request of a client that
//! subscribed to it, whichever replica the request entered through.
//!
//! A request not certified within the retry delay goes to the next replica, which
//! becomes the home (a crashed, partitioned or censoring home only delays requests);
//! after another delay, or at once if the home rejected it, it goes to every replica.
//! The delay is `retry_after` when nothing sent to the home was certified for that long,
//! and otherwise three times the recent latency if that is longer. A request is
//! retried only when something shows it was lost or censored: its home stopped making
//! progress or was left, or a request sent after it was answered first (a home batches
//! its requests in order). One that is merely slow (an overloaded committee answers in
//! order) is not, and a home that refuses a request as busy gets it again after the
//! delay instead of every replica getting it at once: retries past saturation would
//! only add load, and the duplicates ordered would take the place of new transactions.
//! Sessions execute a request once, however many replicas ordered it.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use bulwark_consensus::Height;
use bulwark_crypto::{Committee, KeyPair, ReplicaId};
use bulwark_network::{ClientConnection, NetworkConfig};
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::FastMap;
use crate::wire::{Outcome, Rejection, Replies, Reply, Request, RequestKind, client_id_of};

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
    /// When it was first submitted, and how long it took from then to f + 1 matching
    /// replies.
    pub submitted: tokio::time::Instant,
    pub latency: Duration,
}

/// A client of one committee.
pub struct Client {
    id: u64,
    next_sequence: u64,
    needed: usize,
    senders: BTreeMap<ReplicaId, mpsc::Sender<Request>>,
    /// Replies arrive a frame at a time (each frame from one replica).
    replies: mpsc::Receiver<Vec<Reply>>,
    /// Replies received and not looked at yet.
    inbox: VecDeque<Reply>,
    /// The replica requests go to first.
    home: Option<ReplicaId>,
    /// Submitted requests not certified yet. Replies for any other sequence are ignored.
    outstanding: FastMap<u64, Outstanding>,
    /// Sequences in the order they are due for a retry, with when they were last sent.
    retry_queue: VecDeque<(u64, tokio::time::Instant)>,
    pub timeout: Duration,
    /// The shortest retry delay (see the module documentation).
    pub retry_after: Duration,
    /// Moving average of submit → certified, in seconds.
    latency_average: f64,
    /// When a request sent to the current home was last certified (or the home chosen).
    home_progress: tokio::time::Instant,
    /// The highest sequence answered (certified or rejected by f+1), 0 before any.
    highest_answered: u64,
}

/// One replica's reply to a request: what it reported.
struct Vote {
    replica: ReplicaId,
    height: Height,
    outcome: Outcome,
}

/// Distinct outcomes one replica may report for one request (an honest one reports
/// one, or a rejection and later the result); further ones from it (a Byzantine replica
/// inventing outcomes) are ignored, so a request's tally stays bounded and no replica
/// can crowd out the others' replies.
const OUTCOMES_PER_MEMBER: usize = 4;

struct Outstanding {
    request: Request,
    submitted: tokio::time::Instant,
    /// The home replica it was sent to.
    sent_home: Option<ReplicaId>,
    stage: Stage,
    /// The home refused it as busy: it goes to the home again after the delay.
    refused: bool,
    /// Replies so far (fewer than f + 1 of them match).
    votes: Vec<Vote>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Sent to the home replica only.
    Home,
    /// Also sent to the next replica.
    Next,
    /// Sent to every replica.
    All,
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
            None => crate::wire::keyless_client_id(),
        };
        let (reply_tx, replies) = mpsc::channel::<Vec<Reply>>(4096);
        let mut senders = BTreeMap::new();
        for (replica, address) in endpoints {
            let Ok(mut connection) = ClientConnection::<Request, Replies>::connect(
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
                let mut queued = Vec::new();
                loop {
                    tokio::select! {
                        count = rx.recv_many(&mut queued, 1024) => {
                            if count == 0 || connection.send_many(&queued).await.is_err() { break }
                            queued.clear();
                        }
                        replies = connection.recv() => match replies {
                            Ok(mut replies) => {
                                // A replica can only speak for itself.
                                replies.retain(|reply| reply.replica == replica);
                                if !replies.is_empty() {
                                    let _ = reply_tx.send(replies).await;
                                }
                            }
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
        // Every replica sends this client the replies of its requests.
        let subscribe = Request { client: id, sequence: 0, kind: RequestKind::Subscribe, op: Bytes::new() };
        for sender in senders.values() {
            let _ = sender.send(subscribe.clone()).await;
        }
        Ok(Client::new(id, needed, senders, replies))
    }

    /// A client with nothing submitted yet; its home is picked by its id.
    fn new(
        id: u64,
        needed: usize,
        senders: BTreeMap<ReplicaId, mpsc::Sender<Request>>,
        replies: mpsc::Receiver<Vec<Reply>>,
    ) -> Client {
        let replicas: Vec<ReplicaId> = senders.keys().copied().collect();
        let home = replicas.get((id % replicas.len().max(1) as u64) as usize).copied();
        Client {
            id,
            next_sequence: 1,
            needed,
            senders,
            replies,
            inbox: VecDeque::new(),
            home,
            outstanding: FastMap::default(),
            retry_queue: VecDeque::new(),
            timeout: Duration::from_secs(10),
            retry_after: Duration::from_secs(1),
            latency_average: 0.0,
            home_progress: tokio::time::Instant::now(),
            highest_answered: 0,
        }
    }

    /// Sends requests to `replica` first (if this client is connected to it).
    pub fn set_home(&mut self, replica: ReplicaId) {
        if self.senders.contains_key(&replica) {
            self.home = Some(replica);
        }
    }

    /// The replica requests go to first.
    pub fn home(&self) -> Option<ReplicaId> {
        self.home
    }

    /// Moves the home to the next connected replica.
    fn rotate_home(&mut self) {
        self.home_progress = tokio::time::Instant::now();
        let next = match self.home {
            Some(home) => self.senders.range(ReplicaId(home.0.saturating_add(1))..).next(),
            None => None,
        };
        self.home = next.or_else(|| self.senders.iter().next()).map(|(id, _)| *id);
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Requests submitted and neither certified nor given up yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Sends an ordered request to the home replica without waiting; returns its
    /// sequence.
    pub async fn submit(&mut self, op: Vec<u8>) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        // Submitted now: time spent waiting on a full queue counts as latency.
        let now = tokio::time::Instant::now();
        let request = Request { client: self.id, sequence, kind: RequestKind::Ordered, op: op.into() };
        let home = self.home.and_then(|h| self.senders.get(&h)).filter(|s| !s.is_closed());
        let sent = match home {
            Some(sender) => sender.send(request.clone()).await.is_ok(),
            None => false,
        };
        if !sent {
            self.send_all(&request).await;
        }
        self.retry_queue.push_back((sequence, now));
        let stage = if sent { Stage::Home } else { Stage::All };
        self.outstanding.insert(
            sequence,
            Outstanding {
                request,
                submitted: now,
                sent_home: self.home,
                stage,
                refused: false,
                votes: Vec::new(),
            },
        );
        sequence
    }

    async fn send_all(&self, request: &Request) {
        for sender in self.senders.values() {
            let _ = sender.send(request.clone()).await;
        }
    }

    /// The retry delay of `entry`: `retry_after` when its home stopped making progress
    /// (nothing sent to it was certified for `retry_after`: crashed, partitioned or
    /// censoring) or was left already; otherwise three times the recent latency if
    /// longer (the committee is slow, not the home).
    fn retry_delay(&self, entry: &Outstanding, now: tokio::time::Instant) -> Duration {
        if entry.stage == Stage::Home && (entry.sent_home != self.home || self.home_stalled(now)) {
            return self.retry_after;
        }
        self.retry_after.max(Duration::from_secs_f64(3.0 * self.latency_average))
    }

    /// Whether nothing sent to the current home was certified for `retry_after`.
    fn home_stalled(&self, now: tokio::time::Instant) -> bool {
        now.duration_since(self.home_progress) >= self.retry_after
    }

    /// When the retry at the front of the queue is due, if any.
    fn next_retry(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let &(sequence, sent) = self.retry_queue.front()?;
        let delay = match self.outstanding.get(&sequence) {
            Some(entry) => self.retry_delay(entry, now),
            None => Duration::ZERO,
        };
        Some(sent + delay)
    }

    /// Retries every request that waited the retry delay since it was last sent: to
    /// the next replica first (which becomes the home), then to every replica.
    async fn resend_due(&mut self, now: tokio::time::Instant) {
        while let Some(&(sequence, sent)) = self.retry_queue.front() {
            let Some(entry) = self.outstanding.get(&sequence) else {
                self.retry_queue.pop_front();
                continue;
            };
            if sent + self.retry_delay(entry, now) > now {
                break;
            }
            self.retry_queue.pop_front();
            let lost =
                entry.sent_home != self.home || self.home_stalled(now) || self.highest_answered > sequence;
            if !lost && !entry.refused {
                // Merely slow: checked again after another delay, nothing sent.
                self.retry_queue.push_back((sequence, now));
                continue;
            }
            let (request, stage, sent_home) = (entry.request.clone(), entry.stage, entry.sent_home);
            let next_stage = if entry.refused {
                // Busy: the home again, a delay later.
                if let Some(home) = self.home.and_then(|h| self.senders.get(&h)) {
                    let _ = home.send(request).await;
                }
                stage
            } else {
                match stage {
                    Stage::Home => {
                        // Move the home on once per failing home, however many of its
                        // requests time out together.
                        if sent_home == self.home {
                            self.rotate_home();
                        }
                        match self.home.filter(|h| Some(*h) != sent_home).and_then(|h| self.senders.get(&h)) {
                            Some(next) => {
                                let _ = next.send(request).await;
                                Stage::Next
                            }
                            None => {
                                self.send_all(&request).await;
                                Stage::All
                            }
                        }
                    }
                    Stage::Next | Stage::All => {
                        self.send_all(&request).await;
                        Stage::All
                    }
                }
            };
            if let Some(entry) = self.outstanding.get_mut(&sequence) {
                entry.stage = next_stage;
                entry.refused = false;
            }
            self.retry_queue.push_back((sequence, now));
        }
    }

    /// A reply already received, without waiting.
    fn try_reply(&mut self) -> Option<Reply> {
        loop {
            if let Some(reply) = self.inbox.pop_front() {
                return Some(reply);
            }
            self.inbox.extend(self.replies.try_recv().ok()?);
        }
    }

    /// The next reply; `None` once every connection is gone. Cancel-safe.
    async fn recv_reply(&mut self) -> Option<Reply> {
        loop {
            if let Some(reply) = self.try_reply() {
                return Some(reply);
            }
            let frame = self.replies.recv().await?;
            self.inbox.extend(frame);
        }
    }

    /// The next reply from any replica, retrying what is due meanwhile.
    async fn next_reply(&mut self, deadline: tokio::time::Instant) -> Result<Reply, ClientError> {
        loop {
            // Checked here too: replies that keep arriving (a Byzantine replica streaming
            // replies this client ignores) must not keep the timeout from firing. One
            // clock read per reply serves both checks.
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(self.timeout));
            }
            self.resend_due(now).await;
            // Under load a reply is usually waiting: no timers to arm then. Taking it
            // still counts against the task's budget, so a stream of replies yields to
            // the runtime like a channel receive would.
            let reply = match self.try_reply() {
                Some(reply) => {
                    tokio::task::coop::consume_budget().await;
                    reply
                }
                None => {
                    let retry_at = self.next_retry(tokio::time::Instant::now());
                    let retry = async {
                        match retry_at {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    let needed = self.needed;
                    tokio::select! {
                        reply = self.recv_reply() => reply.ok_or(ClientError::NotEnoughReplicas { connected: 0, needed })?,
                        _ = retry => continue,
                        _ = tokio::time::sleep_until(deadline) => return Err(ClientError::Timeout(self.timeout)),
                    }
                }
            };
            // A rejection from the home replica alone cannot be certified: ask everyone
            // (another replica may accept, or f+1 confirm the rejection). Busy is
            // backpressure instead: the home gets it again after the retry delay.
            if let Outcome::Rejected(rejection) = &reply.outcome
                && let Some(entry) = self.outstanding.get_mut(&reply.sequence)
                && entry.stage != Stage::All
            {
                if *rejection == Rejection::Busy {
                    entry.refused = entry.stage == Stage::Home;
                } else {
                    entry.stage = Stage::All;
                    let request = entry.request.clone();
                    self.send_all(&request).await;
                }
            }
            return Ok(reply);
        }
    }

    /// The next request (of those submitted) to gather f+1 matching replies.
    pub async fn next_certified(&mut self) -> Result<Result<Certified, Rejection>, ClientError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let reply = self.next_reply(deadline).await?;
            if let Some(done) = self.count(reply) {
                return Ok(done);
            }
        }
    }

    fn count(&mut self, reply: Reply) -> Option<Result<Certified, Rejection>> {
        if matches!(reply.outcome, Outcome::Read(_)) || reply.client != self.id {
            return None;
        }
        // Certified already (or never submitted): later replies are ignored.
        let entry = self.outstanding.get_mut(&reply.sequence)?;
        // Rejections may differ in the height they report: match on the outcome only.
        let height = if matches!(reply.outcome, Outcome::Rejected(_)) { Height(0) } else { reply.height };
        let same = |v: &Vote| v.height == height && v.outcome == reply.outcome;
        let mut from_replica = 0;
        let mut matching = 1;
        for vote in &entry.votes {
            if same(vote) {
                if vote.replica == reply.replica {
                    return None;
                }
                matching += 1;
            }
            from_replica += usize::from(vote.replica == reply.replica);
        }
        if from_replica >= OUTCOMES_PER_MEMBER {
            return None;
        }
        if matching < self.needed {
            entry.votes.push(Vote { replica: reply.replica, height, outcome: reply.outcome });
            return None;
        }
        let done = self.outstanding.remove(&reply.sequence)?;
        let mut replicas: Vec<ReplicaId> =
            done.votes.iter().filter(|v| same(v)).map(|v| v.replica).chain([reply.replica]).collect();
        replicas.sort_unstable();
        self.highest_answered = self.highest_answered.max(reply.sequence);
        let now = tokio::time::Instant::now();
        let latency = now.duration_since(done.submitted);
        self.latency_average = 0.9 * self.latency_average + 0.1 * latency.as_secs_f64();
        if done.sent_home == self.home {
            self.home_progress = now;
        }
        Some(match reply.outcome {
            Outcome::Executed(result) => Ok(Certified {
                sequence: reply.sequence,
                height,
                result,
                replicas,
                submitted: done.submitted,
                latency,
            }),
            Outcome::Rejected(rejection) => Err(rejection),
            Outcome::Read(_) => return None,
        })
    }

    /// Executes `op` through consensus and returns the result f+1 replicas agree on.
    /// Retries (same sequence, so at most once) until the client's timeout.
    pub async fn execute(&mut self, op: Vec<u8>) -> Result<Certified, ClientError> {
        let sequence = self.submit(op).await;
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let reply = match self.next_reply(deadline).await {
                Ok(reply) => reply,
                Err(e) => {
                    // Given up: no more retries for it.
                    self.outstanding.remove(&sequence);
                    return Err(e);
                }
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
        let request = Request { client: self.id, sequence, kind: RequestKind::LocalRead, op: op.into() };
        let _ = sender.send(request).await;
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Timeout(self.timeout));
            }
            tokio::task::coop::consume_budget().await;
            let reply = tokio::time::timeout_at(deadline, self.recv_reply())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A client of a 4-member committee (f + 1 = 2) with request 1 outstanding, and no
    /// connections.
    fn client() -> Client {
        let (_, replies) = mpsc::channel(1);
        let senders = (0..4).map(|i| (ReplicaId(i), mpsc::channel(1).0)).collect();
        let request = Request { client: 7, sequence: 1, kind: RequestKind::Ordered, op: vec![1].into() };
        let outstanding = Outstanding {
            request,
            submitted: tokio::time::Instant::now(),
            sent_home: None,
            stage: Stage::Home,
            refused: false,
            votes: Vec::new(),
        };
        let mut client = Client::new(7, 2, senders, replies);
        client.outstanding.insert(1, outstanding);
        client.next_sequence = 2;
        client
    }

    fn reply(replica: u16, result: &[u8]) -> Reply {
        Reply {
            client: 7,
            sequence: 1,
            replica: ReplicaId(replica),
            height: Height(5),
            outcome: Outcome::Executed(result.to_vec()),
        }
    }

    #[test]
    fn a_replica_inventing_outcomes_neither_certifies_nor_crowds_out_the_others() {
        let mut client = client();
        // Replica 3 sends 1,000 different results, and repeats one of them.
        for i in 0..1000u32 {
            assert!(client.count(reply(3, &i.to_le_bytes())).is_none());
        }
        assert!(client.count(reply(3, &0u32.to_le_bytes())).is_none(), "one replica is not f + 1");
        let tallied: usize = client.outstanding[&1].votes.len();
        assert_eq!(tallied, OUTCOMES_PER_MEMBER, "its outcomes beyond the bound are ignored");
        // Two honest replicas agree: certified, with exactly them as the replicas.
        assert!(client.count(reply(0, b"ok")).is_none());
        let certified = client.count(reply(1, b"ok")).expect("f + 1 matching replies").expect("executed");
        assert_eq!(certified.result, b"ok");
        assert_eq!(certified.replicas, vec![ReplicaId(0), ReplicaId(1)]);
        // Certified once: later replies for it are ignored.
        assert!(client.count(reply(2, b"ok")).is_none());
        assert!(client.outstanding.is_empty());
    }

    /// What the client sent since the last call, as (replica, sequence).
    fn sent(receivers: &mut BTreeMap<u16, mpsc::Receiver<Request>>) -> Vec<(u16, u64)> {
        let mut out = Vec::new();
        for (replica, rx) in receivers.iter_mut() {
            while let Ok(request) = rx.try_recv() {
                out.push((*replica, request.sequence));
            }
        }
        out
    }

    fn answer(
        client: &mut Client,
        sequence: u64,
        outcome: Outcome,
        from: &[u16],
    ) -> Option<Result<Certified, Rejection>> {
        from.iter()
            .map(|r| Reply {
                client: 7,
                sequence,
                replica: ReplicaId(*r),
                height: Height(3),
                outcome: outcome.clone(),
            })
            .fold(None, |done, reply| done.or(client.count(reply)))
    }

    #[tokio::test]
    async fn retries_follow_lost_requests_but_add_no_load_to_a_slow_committee() {
        // Real time, scaled down: retries are due 100 ms after a send, and each wait
        // below is longer (a slow machine only makes more of them due).
        let wait = || tokio::time::sleep(Duration::from_millis(150));
        let (_, replies) = mpsc::channel(1);
        let mut receivers = BTreeMap::new();
        let senders = (0..4u16)
            .map(|i| {
                let (tx, rx) = mpsc::channel(16);
                receivers.insert(i, rx);
                (ReplicaId(i), tx)
            })
            .collect();
        let mut client = Client::new(7, 2, senders, replies);
        client.retry_after = Duration::from_millis(100);
        client.set_home(ReplicaId(0));
        let (one, two) = (client.submit(vec![1]).await, client.submit(vec![2]).await);
        assert_eq!(sent(&mut receivers), vec![(0, one), (0, two)]);

        // Past the retry delay, but the home makes progress and nothing sent later was
        // answered: an overloaded committee, not a lost request. Nothing is resent.
        wait().await;
        client.home_progress = tokio::time::Instant::now();
        client.resend_due(tokio::time::Instant::now()).await;
        assert_eq!(sent(&mut receivers), vec![]);

        // Request two is certified before one: one was lost (or censored) at the home,
        // so once its delay passes it goes to the next replica.
        assert!(answer(&mut client, two, Outcome::Executed(vec![]), &[0, 1]).is_some());
        wait().await;
        client.home_progress = tokio::time::Instant::now();
        client.resend_due(tokio::time::Instant::now()).await;
        assert_eq!(sent(&mut receivers), vec![(1, one)]);
        assert_eq!(client.home(), Some(ReplicaId(1)));
        assert!(answer(&mut client, one, Outcome::Executed(vec![]), &[1, 2]).is_some());

        // The home refuses a request as busy: not fanned out to every replica (that
        // would add load where there is too much), but sent to the home again later.
        let three = client.submit(vec![3]).await;
        assert_eq!(sent(&mut receivers), vec![(1, three)]);
        client.inbox.push_back(Reply {
            client: 7,
            sequence: three,
            replica: ReplicaId(1),
            height: Height(0),
            outcome: Outcome::Rejected(Rejection::Busy),
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        client.home_progress = tokio::time::Instant::now();
        let busy = client.next_reply(deadline).await.unwrap();
        assert!(client.count(busy).is_none(), "one replica's refusal certifies nothing");
        assert_eq!(sent(&mut receivers), vec![]);
        wait().await;
        client.home_progress = tokio::time::Instant::now();
        client.resend_due(tokio::time::Instant::now()).await;
        let resent = sent(&mut receivers);
        assert!(resent.contains(&(1, three)), "{resent:?}");
        assert!(!resent.iter().any(|(r, s)| *s == three && *r != 1), "{resent:?}");
        assert!(answer(&mut client, three, Outcome::Executed(vec![]), &[1, 2]).is_some());

        // Any other rejection is fanned out at once: f + 1 replicas must confirm it.
        let four = client.submit(vec![4]).await;
        sent(&mut receivers);
        client.inbox.push_back(Reply {
            client: 7,
            sequence: four,
            replica: ReplicaId(1),
            height: Height(0),
            outcome: Outcome::Rejected(Rejection::TooOld { sequence: four }),
        });
        client.home_progress = tokio::time::Instant::now();
        client.next_reply(deadline).await.unwrap();
        assert_eq!(sent(&mut receivers), vec![(0, four), (1, four), (2, four), (3, four)]);
    }

    #[tokio::test]
    async fn a_stream_of_ignored_replies_does_not_hold_off_the_timeout() {
        let mut client = client();
        client.timeout = Duration::ZERO;
        // Replies for a request this client never sent: each is ignored.
        client.inbox = (0..10_000).map(|_| Reply { sequence: 99, ..reply(3, b"x") }).collect();
        let result = client.next_certified().await;
        assert!(matches!(result, Err(ClientError::Timeout(_))), "{result:?}");
    }
}
