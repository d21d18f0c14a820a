//! Loopback benchmark of the QUIC transport against a plain TCP baseline with the same
//! framing (4-byte length prefix, codec-encoded messages, the same write batching and
//! the same frame decoder), in the same run.
//!
//! `cargo bench -p bulwark-network --bench transport [-- --quick]`
//!
//! Prints one JSON object on stdout, then a human summary on stderr.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_crypto::{Committee, KeyPair, Member, ReplicaId};
use bulwark_network::framing::{FrameDecoder, decode_body, encode_frame};
use bulwark_network::{Inbound, NetworkConfig, ReplicaNetwork};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[derive(Serialize, Deserialize)]
struct Payload {
    seq: u64,
    body: Vec<u8>,
}

const MAX_FRAME: usize = 1 << 20;
const RECEIVE_QUEUE: usize = 4096;
const WRITE_BATCH: usize = 256 << 10;

fn config(queue: usize) -> NetworkConfig {
    NetworkConfig {
        max_frame_bytes: MAX_FRAME,
        send_queue_capacity: queue,
        receive_queue_capacity: RECEIVE_QUEUE,
        max_write_batch_bytes: WRITE_BATCH,
        ..NetworkConfig::default()
    }
}

/// Sending end of a transport under test.
trait Sender {
    fn try_send(&self, message: &Payload) -> bool;
}

struct Quic {
    network: Arc<ReplicaNetwork<Payload>>,
    to: ReplicaId,
}

impl Sender for Quic {
    fn try_send(&self, message: &Payload) -> bool {
        self.network.send(self.to, message).is_ok()
    }
}

struct Tcp {
    queue: mpsc::Sender<Bytes>,
}

impl Sender for Tcp {
    fn try_send(&self, message: &Payload) -> bool {
        match encode_frame(message, MAX_FRAME) {
            Ok(frame) => self.queue.try_send(frame).is_ok(),
            Err(_) => false,
        }
    }
}

/// Sends, waiting for room in the (bounded, non-blocking) queue when it is full.
async fn send(sender: &impl Sender, message: &Payload) {
    while !sender.try_send(message) {
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

type Receiver = mpsc::Receiver<(ReplicaId, Payload)>;

/// What either transport hands the receiver: QUIC's messages carry their receive-budget
/// charge (given back when dropped), the TCP baseline's do not.
trait Received: Send + 'static {
    fn payload(self) -> Payload;
}

impl Received for (ReplicaId, Payload) {
    fn payload(self) -> Payload {
        self.1
    }
}

impl Received for (ReplicaId, Payload, bulwark_network::Charge) {
    fn payload(self) -> Payload {
        self.1
    }
}

/// Two replicas of a 4-member committee on loopback (the other two members' sockets
/// are bound but silent), connected both ways.
async fn quic_pair(queue: usize) -> (Quic, Inbound<Payload>, Quic, Inbound<Payload>, Vec<UdpSocket>) {
    let keys: Vec<KeyPair> = (0..4).map(|_| KeyPair::generate()).collect();
    let mut sockets: Vec<UdpSocket> = (0..4).map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind")).collect();
    let members = (0..4)
        .map(|i| Member {
            id: ReplicaId(i as u16),
            public_key: keys[i].public(),
            address: sockets[i].local_addr().expect("addr").to_string(),
        })
        .collect();
    let committee = Committee::new("bench", members).expect("committee");
    let idle = sockets.split_off(2);
    let mut sockets = sockets.into_iter();
    let mut start = |id: u16| {
        let socket = sockets.next().expect("socket");
        ReplicaNetwork::<Payload>::start_on(
            config(queue),
            committee.clone(),
            ReplicaId(id),
            &keys[usize::from(id)],
            socket,
        )
    };
    let (a, mut a_in) = start(0).await.expect("start 0");
    let (b, mut b_in) = start(1).await.expect("start 1");
    let (a, b) = (Arc::new(a), Arc::new(b));
    let warm = Payload { seq: 0, body: vec![] };
    a.send(ReplicaId(1), &warm).expect("warm-up");
    b.send(ReplicaId(0), &warm).expect("warm-up");
    b_in.recv().await.expect("warm-up");
    a_in.recv().await.expect("warm-up");
    (Quic { network: a, to: ReplicaId(1) }, a_in, Quic { network: b, to: ReplicaId(0) }, b_in, idle)
}

/// One TCP connection; each end has the same queue, batching writer and frame decoder
/// as the QUIC transport.
async fn tcp_pair(queue: usize) -> (Tcp, Receiver, Tcp, Receiver) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let (dialed, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
    let (a, b) = (dialed.expect("connect"), accepted.expect("accept").0);
    let (a_send, a_in) = tcp_end(a, queue, ReplicaId(1));
    let (b_send, b_in) = tcp_end(b, queue, ReplicaId(0));
    (a_send, a_in, b_send, b_in)
}

fn tcp_end(stream: TcpStream, queue: usize, peer: ReplicaId) -> (Tcp, Receiver) {
    stream.set_nodelay(true).expect("nodelay");
    let (mut read, write) = stream.into_split();
    let (sender, mut queued) = mpsc::channel::<Bytes>(queue);
    tokio::spawn(async move {
        let mut write = BufWriter::with_capacity(WRITE_BATCH, write);
        while let Some(first) = queued.recv().await {
            let mut bytes = first.len();
            if write.write_all(&first).await.is_err() {
                return;
            }
            while bytes < WRITE_BATCH {
                let Ok(frame) = queued.try_recv() else { break };
                bytes += frame.len();
                if write.write_all(&frame).await.is_err() {
                    return;
                }
            }
            if write.flush().await.is_err() {
                return;
            }
        }
    });
    let (deliver, inbound) = mpsc::channel(RECEIVE_QUEUE);
    tokio::spawn(async move {
        let mut decoder = FrameDecoder::new(MAX_FRAME);
        let mut chunk = BytesMut::with_capacity(64 << 10);
        loop {
            chunk.clear();
            match read.read_buf(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => decoder.extend(&chunk),
            }
            while let Ok(Some(body)) = decoder.next_frame() {
                let Ok(message) = decode_body::<Payload>(&body, MAX_FRAME) else { return };
                if deliver.send((peer, message)).await.is_err() {
                    return;
                }
            }
        }
    });
    (Tcp { queue: sender }, inbound)
}

struct Throughput {
    msgs_per_s: f64,
    mb_per_s: f64,
}

async fn throughput<R: Received>(
    sender: &impl Sender,
    inbound: &mut mpsc::Receiver<R>,
    size: usize,
    count: u64,
) -> Throughput {
    let started = Instant::now();
    let receiving = async {
        for expected in 0..count {
            let message = inbound.recv().await.expect("receive").payload();
            assert_eq!(message.seq, expected, "in order, nothing dropped");
        }
    };
    let sending = async {
        let mut message = Payload { seq: 0, body: vec![0x5A; size] };
        for seq in 0..count {
            message.seq = seq;
            send(sender, &message).await;
        }
    };
    tokio::join!(sending, receiving);
    let secs = started.elapsed().as_secs_f64();
    Throughput { msgs_per_s: count as f64 / secs, mb_per_s: (count as f64 * size as f64) / secs / 1e6 }
}

struct Latency {
    p50_us: f64,
    p99_us: f64,
}

/// 512 B ping-pong: `a` sends, `b` echoes, `a` times the round trip.
async fn ping_pong<S: Sender + Send + Sync + 'static, R: Received>(
    a: &impl Sender,
    a_in: &mut mpsc::Receiver<R>,
    b: S,
    mut b_in: mpsc::Receiver<R>,
    rounds: usize,
) -> Latency {
    let echo = tokio::spawn(async move {
        while let Some(received) = b_in.recv().await {
            let message = received.payload();
            send(&b, &message).await;
        }
    });
    let mut samples = Vec::with_capacity(rounds);
    let mut message = Payload { seq: 0, body: vec![0xA5; 512] };
    for round in 0..rounds + rounds / 10 {
        message.seq = round as u64;
        let started = Instant::now();
        send(a, &message).await;
        let back = a_in.recv().await.expect("echo").payload();
        assert_eq!(back.seq, round as u64);
        if round >= rounds / 10 {
            samples.push(started.elapsed());
        }
    }
    echo.abort();
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6;
    Latency { p50_us: at(0.50), p99_us: at(0.99) }
}

/// The floor under our transport: 512 B ping-pong over one raw quinn bidirectional
/// stream with the same TLS configuration, no queues or tasks of ours in the path.
async fn raw_quinn_ping_pong(rounds: usize) -> Latency {
    use bulwark_network::identity::{Identity, replica_name};
    use bulwark_network::tls;
    let keys: Vec<KeyPair> = (0..4).map(|_| KeyPair::generate()).collect();
    let members = (0..4)
        .map(|i| Member {
            id: ReplicaId(i as u16),
            public_key: keys[i].public(),
            address: format!("127.0.0.1:{}", 9 + i),
        })
        .collect();
    let committee = Arc::new(Committee::new("raw", members).expect("committee"));
    let config = config(16);
    let identity =
        |i: usize| Identity::self_signed(&keys[i], &replica_name(ReplicaId(i as u16))).expect("identity");
    let mut server_config =
        tls::replica_server_config(&config, committee.clone(), &identity(1), Default::default())
            .expect("server");
    // Allow the one bidirectional stream this measurement uses.
    let mut transport = tls::transport_config(&config, tls::StreamRole::Client).expect("transport");
    transport.max_concurrent_bidi_streams(1u32.into());
    server_config.transport_config(Arc::new(transport));
    let server =
        quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().expect("addr")).expect("server");
    let address = server.local_addr().expect("addr");
    let client_config =
        tls::replica_client_config(&config, committee, &identity(0), Default::default()).expect("client");
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    let echo = tokio::spawn(async move {
        let connection = server.accept().await.expect("incoming").await.expect("handshake");
        let (mut send, mut recv) = connection.accept_bi().await.expect("stream");
        let mut buffer = [0u8; 516];
        while recv.read_exact(&mut buffer).await.is_ok() {
            if send.write_all(&buffer).await.is_err() {
                return;
            }
        }
    });
    let connection = client
        .connect_with(client_config, address, &replica_name(ReplicaId(1)))
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = connection.open_bi().await.expect("stream");
    let mut buffer = [0x77u8; 516];
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds + rounds / 10 {
        let started = Instant::now();
        send.write_all(&buffer).await.expect("write");
        recv.read_exact(&mut buffer).await.expect("read");
        if round >= rounds / 10 {
            samples.push(started.elapsed());
        }
    }
    echo.abort();
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6;
    Latency { p50_us: at(0.50), p99_us: at(0.99) }
}

struct Results {
    small: Throughput,
    large: Throughput,
    latency: Latency,
}

fn json(name: &str, r: &Results) -> String {
    format!(
        "\"{name}\":{{\"throughput_512B\":{{\"msgs_per_s\":{:.0},\"mb_per_s\":{:.1}}},\
         \"throughput_64KiB\":{{\"msgs_per_s\":{:.0},\"mb_per_s\":{:.1}}},\
         \"ping_pong_512B\":{{\"p50_us\":{:.1},\"p99_us\":{:.1}}}}}",
        r.small.msgs_per_s,
        r.small.mb_per_s,
        r.large.msgs_per_s,
        r.large.mb_per_s,
        r.latency.p50_us,
        r.latency.p99_us
    )
}

/// Encode + decode round trips per second of one payload: the codec's share of the
/// cost, the same for both transports.
fn codec_rate(size: usize, count: u64) -> f64 {
    let message = Payload { seq: 1, body: vec![0x33; size] };
    let started = Instant::now();
    for _ in 0..count {
        let frame = encode_frame(&message, MAX_FRAME).expect("encode");
        let back: Payload = decode_body(&frame[4..], MAX_FRAME).expect("decode");
        assert_eq!(back.body.len(), size);
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// The QUIC transport between two replicas: 512 B and 64 KiB throughput, then 512 B
/// ping-pong, each on a fresh pair (dropped before the next measurement).
async fn run_quic(small_count: u64, large_count: u64, rounds: usize) -> Results {
    let small = {
        let (a, _a_in, _b, mut b_in, _idle) = quic_pair(8192).await;
        throughput(&a, &mut b_in, 512, small_count).await
    };
    let large = {
        let (a, _a_in, _b, mut b_in, _idle) = quic_pair(512).await;
        throughput(&a, &mut b_in, 64 << 10, large_count).await
    };
    let latency = {
        let (a, mut a_in, b, b_in, _idle) = quic_pair(8192).await;
        ping_pong(&a, &mut a_in, b, b_in, rounds).await
    };
    Results { small, large, latency }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (small_count, large_count, rounds) =
        if quick { (50_000, 1_000, 1_000) } else { (300_000, 6_000, 5_000) };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (quic, tcp, raw) = runtime.block_on(async {
        let quic = run_quic(small_count, large_count, rounds).await;
        let tcp = {
            let small = {
                let (a, _a_in, _b, mut b_in) = tcp_pair(8192).await;
                throughput(&a, &mut b_in, 512, small_count).await
            };
            let large = {
                let (a, _a_in, _b, mut b_in) = tcp_pair(512).await;
                throughput(&a, &mut b_in, 64 << 10, large_count).await
            };
            let (a, mut a_in, b, b_in) = tcp_pair(8192).await;
            let latency = ping_pong(&a, &mut a_in, b, b_in, rounds).await;
            Results { small, large, latency }
        };
        let raw = raw_quinn_ping_pong(rounds).await;
        (quic, tcp, raw)
    });
    let codec_small = codec_rate(512, small_count / 10);
    let codec_large = codec_rate(64 << 10, large_count / 10);
    println!(
        "{{{},{},\"raw_quinn_ping_pong_512B\":{{\"p50_us\":{:.1},\"p99_us\":{:.1}}},\
         \"codec_round_trips_per_s\":{{\"512B\":{codec_small:.0},\"64KiB\":{codec_large:.0}}}}}",
        json("quic", &quic),
        json("tcp", &tcp),
        raw.p50_us,
        raw.p99_us
    );
    eprintln!(
        "loopback, 2 tokio workers, {small_count} x 512 B, {large_count} x 64 KiB, {rounds} ping-pongs"
    );
    for (name, r) in [("QUIC", &quic), ("TCP", &tcp)] {
        eprintln!(
            "{name:<4}: 512 B {:>9.0} msg/s {:>7.1} MB/s | 64 KiB {:>7.0} msg/s {:>7.1} MB/s | ping-pong 512 B p50 {:>6.1} us p99 {:>6.1} us",
            r.small.msgs_per_s,
            r.small.mb_per_s,
            r.large.msgs_per_s,
            r.large.mb_per_s,
            r.latency.p50_us,
            r.latency.p99_us
        );
    }
    eprintln!(
        "raw quinn stream (no queues or tasks of ours): ping-pong 512 B p50 {:.1} us p99 {:.1} us",
        raw.p50_us, raw.p99_us
    );
    eprintln!(
        "codec alone (encode + decode, one thread): 512 B {codec_small:.0}/s, 64 KiB {codec_large:.0}/s"
    );
    eprintln!(
        "QUIC/TCP: 512 B throughput {:.2}x, 64 KiB throughput {:.2}x, p50 latency {:.2}x",
        quic.small.msgs_per_s / tcp.small.msgs_per_s,
        quic.large.msgs_per_s / tcp.large.msgs_per_s,
        quic.latency.p50_us / tcp.latency.p50_us
    );
}
