//! rzab-transport-tool: runs one transport endpoint as a separate process.
//!
//! - `peer`: publishes its endpoint record on stdout as JSON, reads the other side's from
//!   stdin, then echoes datagrams back or sinks them and reports counts. Tests use it to
//!   exchange endpoints between two real processes.
//! - `bench`: the raw message rate of shm and udp between two processes (this one sending, a
//!   `peer --mode sink` child receiving, each pinned to its own core), next to a bare
//!   single-producer single-consumer shared-memory ring measured in the same run. Prints a table.
//!
//! - `ring-pingpong`: round trips between two threads pinned to cores 0 and 1 over two shared
//!   cache lines, the latency limit a commit (a PREPARE out, an ACK back) is compared against.
//!
//! It touches the transports it opens, a temporary ring file for the baseline, and its child.

#![allow(
    clippy::cast_possible_truncation,
    reason = "benchmark sizes, batch indices and counts are small and bounded by the options"
)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use memmap2::MmapMut;
use rzab_dataplane::transport::shm::{ShmConfig, ShmTransport};
use rzab_dataplane::transport::udp::{UdpConfig, UdpTransport};
use rzab_dataplane::transport::{
    Destination, MulticastGroup, RecvCompletion, SendRequest, Transport,
};
use rzab_shared::{EndpointAddress, EndpointRecord};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Run an rzab transport endpoint as its own process, or benchmark transports"
)]
struct Options {
    #[command(subcommand)]
    command: Command_,
}

#[derive(Debug, Subcommand)]
enum Command_ {
    /// One endpoint that exchanges endpoint records over stdin/stdout, then echoes or sinks.
    Peer(PeerOptions),
    /// Raw message rate between two processes, printed as a table.
    Bench(BenchOptions),
    /// What sealing and checking a datagram costs (CRC32C and the keyed MAC), by size.
    SealBench(SealBenchOptions),
    /// The bare shared-memory ring's byte rate at one datagram size and batch, the consumer
    /// copying every payload out (median of three runs), printed as one number in bytes per
    /// second: the limit a cluster's replication over shm is compared against.
    RingRate(RingRateOptions),
    /// Round trips between two threads pinned to cores 0 and 1, each way one store to a cache
    /// line the other polls: the latency limit of anything that needs a message and its answer
    /// (a commit: a PREPARE out, an ACK back). Prints the round trip's p50, p99 and p99.9 in
    /// nanoseconds, as `p50 p99 p999`.
    RingPingpong(PingpongOptions),
}

#[derive(Clone, Debug, clap::Args)]
struct PingpongOptions {
    /// Round trips to time.
    #[arg(long, default_value_t = 200_000)]
    rounds: u64,
}

/// Two counters on their own cache lines: the ping the first thread writes, the pong the
/// second answers with.
#[repr(C, align(64))]
struct Line(AtomicU64);

fn ring_pingpong(options: &PingpongOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=100_000_000).contains(&options.rounds),
        "--rounds must be in 1..=100000000"
    );
    let lines = Arc::new([Line(AtomicU64::new(0)), Line(AtomicU64::new(0))]);
    let rounds = options.rounds;
    let answering = Arc::clone(&lines);
    let answerer = std::thread::spawn(move || {
        pin(Some(1));
        for round in 1..=rounds {
            while answering[0].0.load(Ordering::Acquire) != round {
                std::hint::spin_loop();
            }
            answering[1].0.store(round, Ordering::Release);
        }
    });
    pin(Some(0));
    let mut trips = Vec::with_capacity(usize::try_from(rounds).unwrap_or(0));
    for round in 1..=rounds {
        let start = Instant::now();
        lines[0].0.store(round, Ordering::Release);
        while lines[1].0.load(Ordering::Acquire) != round {
            std::hint::spin_loop();
        }
        trips.push(start.elapsed().as_nanos() as f64);
    }
    answerer
        .join()
        .map_err(|_| anyhow::anyhow!("the answering thread panicked"))?;
    trips.sort_by(f64::total_cmp);
    let at = |quantile: f64| trips[((trips.len() - 1) as f64 * quantile) as usize];
    println!("{:.0} {:.0} {:.0}", at(0.5), at(0.99), at(0.999));
    Ok(())
}

#[derive(Clone, Debug, clap::Args)]
struct RingRateOptions {
    /// Bytes per datagram.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Datagrams per release.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

fn ring_rate(options: &RingRateOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=1 << 20).contains(&options.size) && (1..=1024).contains(&options.batch),
        "--size must be 1..=1048576 and --batch 1..=1024"
    );
    let rates = (0..3)
        .map(|_| measure_bare_ring(options.size, options.batch, options.seconds, true))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    println!("{:.0}", median(rates) * options.size as f64);
    Ok(())
}

#[derive(Clone, Debug, clap::Args)]
struct SealBenchOptions {
    /// Datagram sizes to measure, in bytes (at least a header each).
    #[arg(long, value_delimiter = ',', default_values_t = [112usize, 1024, 4096])]
    sizes: Vec<usize>,
    /// Seals (and checks) timed per size and integrity mode.
    #[arg(long, default_value_t = 200_000)]
    iterations: u64,
}

/// Median of three runs of `iterations` calls of `step`, in nanoseconds per call.
fn time_per_call(iterations: u64, mut step: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..3)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..iterations {
                step();
            }
            started.elapsed().as_nanos() as f64 / iterations.max(1) as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[1]
}

fn seal_bench(options: &SealBenchOptions) -> anyhow::Result<()> {
    use rzab_dataplane::zab::wire::{self, Integrity, Kind, WireContext};
    let run = wire::run_tag("seal-bench");
    let modes = [
        Integrity::Crc32c,
        Integrity::mac(b"seal-bench secret of 32 bytes!!!", run),
    ];
    println!(
        "sealing and checking one datagram (header + body), median of 3 x {} calls",
        options.iterations
    );
    println!("| bytes | crc32c seal (ns) | crc32c check (ns) | mac seal (ns) | mac check (ns) |");
    println!("|---|---|---|---|---|");
    for &size in &options.sizes {
        anyhow::ensure!(
            size >= wire::HEADER_BYTES,
            "--sizes: {size} is shorter than a {}-byte header",
            wire::HEADER_BYTES
        );
        let mut cells = Vec::new();
        for integrity in modes {
            let mut datagram = vec![0x5au8; size];
            wire::put_header(
                &mut datagram,
                &wire::Header {
                    kind: Kind::Credit,
                    from_node: 0,
                    pipeline: 0,
                    count: 0,
                    cluster_tag: 1,
                    slot_words: 0,
                    flags: 0,
                    run,
                    instance: 1,
                    epoch: 1,
                    words: [0; wire::WORDS],
                },
            );
            let context = WireContext {
                cluster_tag: 1,
                run,
                slot_len: 0,
                max_txn_len: 0,
                snapshot_slot_len: 0,
                nodes: 1,
                pipelines: 1,
                integrity,
            };
            let seal = time_per_call(options.iterations, || {
                wire::seal(std::hint::black_box(&mut datagram), &integrity);
            });
            // The body is not a CREDIT's, so the check passes and the length check refuses
            // it after: the time is the check's plus a few comparisons.
            let mut passed = true;
            let check = time_per_call(options.iterations, || {
                passed &= !matches!(
                    context.decode(std::hint::black_box(&datagram)),
                    Err(wire::WireError::BadCheck)
                );
            });
            anyhow::ensure!(passed, "a sealed datagram failed its own check");
            cells.push(format!("{seal:.0} | {check:.0}"));
        }
        println!("| {size} | {} |", cells.join(" | "));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    Shm,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Send every datagram back to the other side.
    Echo,
    /// Count datagrams until told to stop on stdin, then report.
    Sink,
}

#[derive(Clone, Debug, clap::Args)]
struct EndpointOptions {
    #[arg(long, value_enum, default_value = "shm")]
    transport: Backend,
    /// shm: fabric name.
    #[arg(long, default_value = "rzab-tool")]
    fabric: String,
    /// shm: directory of the fabric file.
    #[arg(long, default_value = "/dev/shm")]
    shm_dir: PathBuf,
    /// shm: port to take.
    #[arg(long, default_value_t = 1)]
    port: u32,
    /// udp: address to bind (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddrV4,
    /// udp: port shared by the multicast groups.
    #[arg(long, default_value_t = 47_000)]
    multicast_port: u16,
    #[arg(long, default_value_t = 1024)]
    mtu: u32,
    #[arg(long, default_value_t = 256)]
    recv_slots: u32,
}

#[derive(Debug, clap::Args)]
struct PeerOptions {
    #[command(flatten)]
    endpoint: EndpointOptions,
    #[arg(long, value_enum, default_value = "echo")]
    mode: Mode,
    /// Join this multicast group before publishing the endpoint.
    #[arg(long)]
    join: Option<u16>,
    /// echo: stop after this many datagrams.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Give up after this many seconds whatever happens.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Pin to this core.
    #[arg(long)]
    core: Option<usize>,
}

#[derive(Debug, clap::Args)]
struct BenchOptions {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Repetitions of each measurement; the table shows the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Backends to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["shm", "udp"])]
    backends: Vec<Backend>,
}

fn open_shm(options: &EndpointOptions, port: u32) -> anyhow::Result<ShmTransport> {
    let config = ShmConfig {
        fabric: options.fabric.clone(),
        dir: options.shm_dir.clone(),
        port,
        ports: 8,
        ring_slots: options.recv_slots,
        mtu: options.mtu,
        max_chain: 32,
    };
    Ok(ShmTransport::open(&config)?)
}

fn open_udp(options: &EndpointOptions) -> anyhow::Result<UdpTransport> {
    let config = UdpConfig {
        bind: options.bind,
        multicast_base: UdpConfig::default().multicast_base,
        multicast_port: options.multicast_port,
        mtu: options.mtu as usize,
        recv_slots: options.recv_slots as usize,
        max_chain: 32,
        socket_buffer: 8 << 20,
    };
    Ok(UdpTransport::open(&config)?)
}

fn pin(core: Option<usize>) {
    if let Some(core) = core {
        let _ = core_affinity::set_for_current(core_affinity::CoreId { id: core });
    }
}

/// Reads lines from stdin on a helper thread: the first is the peer's endpoint, any later one
/// (or end of input) means stop.
fn stdin_watcher() -> (std::sync::mpsc::Receiver<String>, Arc<AtomicBool>) {
    let (sender, receiver) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = Arc::clone(&stop);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut first = true;
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if first {
                first = false;
                if sender.send(line).is_err() {
                    break;
                }
            } else {
                break;
            }
        }
        stop_flag.store(true, Ordering::Release);
    });
    (receiver, stop)
}

fn run_peer<T: Transport>(mut endpoint: T, options: &PeerOptions) -> anyhow::Result<()> {
    if let Some(group) = options.join {
        endpoint.join_multicast(MulticastGroup(group))?;
    }
    endpoint.post_recv(endpoint.caps().recv_slots);
    let record = EndpointRecord::new(1, 0, endpoint.local_address());
    println!("{}", serde_json::json!({ "endpoint": record }));
    std::io::stdout().flush()?;

    let (lines, stop) = stdin_watcher();
    let deadline = Instant::now() + Duration::from_secs(options.timeout);
    let line = lines
        .recv_timeout(Duration::from_secs(options.timeout))
        .context("waiting for the other side's endpoint on stdin")?;
    let other: EndpointRecord =
        serde_json::from_str(&line).context("parsing the other side's endpoint")?;
    let back = endpoint.resolve(&other.address)?;

    let mut completions = [RecvCompletion::default(); 32];
    let mut handled = 0u64;
    let mut first_arrival: Option<Instant> = None;
    let mut last_arrival = Instant::now();
    let mut checksum = 0u64;
    // The clock is read once every CLOCK_EVERY polls, not per poll: at a hundred million
    // datagrams a second in batches of 16, two clock reads per batch were a quarter of this
    // sink's time, so it measured itself rather than the transport. The error it leaves, at
    // most CLOCK_EVERY polls at the ends of a run of a second, is below a thousandth.
    const CLOCK_EVERY: u32 = 64;
    let mut polls = 0u32;
    let mut arrived_since_clock = false;
    loop {
        polls = polls.wrapping_add(1);
        if polls % CLOCK_EVERY == 0 {
            let now = Instant::now();
            if arrived_since_clock {
                last_arrival = now;
                arrived_since_clock = false;
            }
            if now >= deadline {
                break;
            }
        }
        if stop.load(Ordering::Acquire) || (options.mode == Mode::Echo && handled >= options.count)
        {
            break;
        }
        let count = endpoint.poll_recv(&mut completions);
        if count == 0 {
            std::hint::spin_loop();
            continue;
        }
        if first_arrival.is_none() {
            let now = Instant::now();
            first_arrival = Some(now);
            last_arrival = now;
        }
        arrived_since_clock = true;
        match options.mode {
            Mode::Sink => {
                for completion in &completions[..count] {
                    let payload = endpoint.recv_payload(completion);
                    checksum =
                        checksum.wrapping_add(u64::from(payload.first().copied().unwrap_or(0)));
                }
            }
            Mode::Echo => {
                let mut chain = [SendRequest {
                    destination: Destination::Unicast(back),
                    buffer: 0,
                    len: 0,
                }; 32];
                for (index, completion) in completions[..count].iter().enumerate() {
                    let len = completion.len as usize;
                    let mut copy = [0u8; 4096];
                    copy[..len].copy_from_slice(endpoint.recv_payload(completion));
                    endpoint.send_buffer(index)[..len].copy_from_slice(&copy[..len]);
                    chain[index] = SendRequest {
                        destination: Destination::Unicast(back),
                        buffer: u16::try_from(index)?,
                        len: completion.len,
                    };
                }
                endpoint.post_send(&chain[..count])?;
            }
        }
        endpoint.post_recv(count);
        handled += count as u64;
    }
    let elapsed = first_arrival.map_or(0, |first| (last_arrival - first).as_nanos());
    let stats = endpoint.stats();
    println!(
        "{}",
        serde_json::json!({
            "handled": handled,
            "elapsed_ns": u64::try_from(elapsed).unwrap_or(u64::MAX),
            "dropped_no_recv": stats.dropped_no_recv,
            "checksum": checksum,
        })
    );
    Ok(())
}

fn peer(options: &PeerOptions) -> anyhow::Result<()> {
    pin(options.core);
    match options.endpoint.transport {
        Backend::Shm => run_peer(open_shm(&options.endpoint, options.endpoint.port)?, options),
        Backend::Udp => run_peer(open_udp(&options.endpoint)?, options),
    }
}

/// A running `peer --mode sink` child and its pipes.
struct SinkChild {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    address: EndpointAddress,
}

impl SinkChild {
    fn spawn(endpoint: &EndpointOptions) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let transport = match endpoint.transport {
            Backend::Shm => "shm",
            Backend::Udp => "udp",
        };
        let mut child = Command::new(exe)
            .args([
                "peer",
                "--mode",
                "sink",
                "--core",
                "1",
                "--transport",
                transport,
            ])
            .args(["--fabric", &endpoint.fabric, "--port", "1"])
            .args(["--shm-dir", &endpoint.shm_dir.display().to_string()])
            .args([
                "--mtu",
                &endpoint.mtu.to_string(),
                "--recv-slots",
                &endpoint.recv_slots.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning the sink process")?;
        let stdout = child.stdout.take().context("sink stdout")?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let published: serde_json::Value =
            serde_json::from_str(&line).context("sink endpoint line")?;
        let record: EndpointRecord = serde_json::from_value(published["endpoint"].clone())?;
        Ok(SinkChild {
            child,
            stdout,
            address: record.address,
        })
    }

    fn start(&mut self, own: &EndpointAddress) -> anyhow::Result<()> {
        let stdin = self.child.stdin.as_mut().context("sink stdin")?;
        writeln!(
            stdin,
            "{}",
            serde_json::to_string(&EndpointRecord::new(0, 0, *own))?
        )?;
        stdin.flush()?;
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<(u64, u64, u64)> {
        drop(self.child.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        self.child.wait()?;
        let report: serde_json::Value = serde_json::from_str(&line).context("sink report")?;
        let field = |name: &str| report[name].as_u64().unwrap_or(0);
        Ok((
            field("handled"),
            field("elapsed_ns"),
            field("dropped_no_recv"),
        ))
    }
}

/// Sends `size`-byte datagrams in chains of `batch` for `seconds`; returns the receiver's rate
/// in messages per second and the fraction the receiver dropped.
fn measure_transport<T: Transport>(
    mut sender: T,
    endpoint: &EndpointOptions,
    size: usize,
    batch: usize,
    seconds: f64,
) -> anyhow::Result<(f64, f64)> {
    let mut sink = SinkChild::spawn(endpoint)?;
    let to = sender.resolve(&sink.address)?;
    sink.start(&sender.local_address())?;
    for index in 0..batch {
        sender.send_buffer(index)[..size].fill(index as u8);
    }
    let chain: Vec<SendRequest<T::Address>> = (0..batch)
        .map(|index| SendRequest {
            destination: Destination::Unicast(to),
            buffer: index as u16,
            len: size as u32,
        })
        .collect();
    // Let the child get to its poll loop before the clock starts.
    std::thread::sleep(Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    while Instant::now() < deadline {
        for _ in 0..64 {
            sent += sender.post_send(&chain)? as u64;
        }
    }
    let (received, elapsed_ns, dropped) = sink.finish()?;
    if elapsed_ns == 0 || received == 0 {
        bail!("the sink received nothing");
    }
    let rate = received as f64 / (elapsed_ns as f64 / 1e9);
    let drop_fraction = if sent == 0 {
        0.0
    } else {
        dropped as f64 / sent as f64
    };
    Ok((rate, drop_fraction))
}

/// A bare single-producer single-consumer ring in a shared-memory file, with backpressure and
/// one release store per batch: the upper bound a fabric can approach. Producer and consumer
/// are two threads pinned to cores 0 and 1; cache lines move between the cores exactly as they
/// would between two processes mapping the same file.
///
/// With `copy_out` the consumer copies every payload out, as a receiver that keeps the bytes
/// does: the limit for a byte rate. Without it, it reads the first byte: the limit for a
/// message rate.
fn measure_bare_ring(
    size: usize,
    batch: usize,
    seconds: f64,
    copy_out: bool,
) -> anyhow::Result<f64> {
    const SLOTS: usize = 1024;
    let slot_bytes = size.next_multiple_of(64);
    let file = tempfile_in_shm()?;
    file.set_len((128 + SLOTS * slot_bytes) as u64)?;
    // SAFETY: a private temporary file only this function maps; the two threads touch the
    // counters through atomics and each slot only while the ring protocol gives it ownership.
    let mmap = Arc::new(unsafe { MmapMut::map_mut(&file)? });
    let counters = |map: &MmapMut| -> (&AtomicU64, &AtomicU64) {
        // SAFETY: offsets 0 and 64 lie inside the mapping, 8-byte aligned (page-aligned base).
        unsafe {
            (
                &*map.as_ptr().cast::<AtomicU64>(),
                &*map.as_ptr().add(64).cast::<AtomicU64>(),
            )
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let consumer_map = Arc::clone(&mmap);
    let consumer_stop = Arc::clone(&stop);
    let consumer = std::thread::spawn(move || {
        pin(Some(1));
        let (head, tail) = counters(&consumer_map);
        let base = consumer_map.as_ptr();
        let mut position = 0u64;
        let mut checksum = 0u64;
        let mut kept = vec![0u8; if copy_out { size } else { 0 }];
        let start = Instant::now();
        while !consumer_stop.load(Ordering::Relaxed) {
            let available = tail.load(Ordering::Acquire);
            while position < available {
                let slot = (position as usize) % SLOTS;
                if copy_out {
                    // SAFETY: the producer published this slot (`size` bytes inside the
                    // mapping) with the release store on `tail`; `kept` is `size` long.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            base.add(128 + slot * slot_bytes),
                            kept.as_mut_ptr(),
                            size,
                        );
                    }
                    checksum = checksum.wrapping_add(u64::from(kept[size - 1]));
                } else {
                    // SAFETY: the producer published this slot with the release store on
                    // `tail`.
                    checksum = checksum
                        .wrapping_add(u64::from(unsafe { *base.add(128 + slot * slot_bytes) }));
                }
                position += 1;
            }
            head.store(position, Ordering::Release);
        }
        (position, start.elapsed(), checksum)
    });
    pin(Some(0));
    let (head, tail) = counters(&mmap);
    let base = mmap.as_ptr().cast_mut();
    let payload = vec![7u8; size];
    let mut position = 0u64;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        for _ in 0..64 {
            while position + batch as u64 > head.load(Ordering::Acquire) + SLOTS as u64 {
                std::hint::spin_loop();
            }
            for offset in 0..batch as u64 {
                let slot = ((position + offset) as usize) % SLOTS;
                // SAFETY: the consumer has released this slot (head check above).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        payload.as_ptr(),
                        base.add(128 + slot * slot_bytes),
                        size,
                    );
                }
            }
            position += batch as u64;
            tail.store(position, Ordering::Release);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (consumed, elapsed, _) = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("ring consumer panicked"))?;
    Ok(consumed as f64 / elapsed.as_secs_f64())
}

fn tempfile_in_shm() -> anyhow::Result<std::fs::File> {
    let path = PathBuf::from(format!("/dev/shm/rzab-bench-ring-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn bench(options: &BenchOptions) -> anyhow::Result<()> {
    println!(
        "raw message rate between two processes, pinned to cores 0 and 1; median of {} runs of {} s",
        options.runs, options.seconds
    );
    println!("| transport | size (B) | batch | M msg/s | vs bare ring | dropped at receiver |");
    println!("|---|---|---|---|---|---|");
    for size in [64usize, 256] {
        for batch in [1usize, 16] {
            let ring = median(
                (0..options.runs)
                    .map(|_| measure_bare_ring(size, batch, options.seconds, false))
                    .collect::<anyhow::Result<_>>()?,
            );
            println!(
                "| bare SPSC ring | {size} | {batch} | {:.1} | 100% | - |",
                ring / 1e6
            );
            for backend in &options.backends {
                let mut rates = Vec::new();
                let mut drops = Vec::new();
                for run in 0..options.runs {
                    let endpoint = EndpointOptions {
                        transport: *backend,
                        fabric: format!("bench-{}-{size}-{batch}-{run}", std::process::id()),
                        shm_dir: PathBuf::from("/dev/shm"),
                        port: 0,
                        bind: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
                        multicast_port: 47_000,
                        mtu: 1024,
                        recv_slots: 1024,
                    };
                    pin(Some(0));
                    let (rate, dropped) = match backend {
                        Backend::Shm => {
                            let result = measure_transport(
                                open_shm(&endpoint, 0)?,
                                &endpoint,
                                size,
                                batch,
                                options.seconds,
                            );
                            let _ = std::fs::remove_file(
                                ShmConfig {
                                    fabric: endpoint.fabric.clone(),
                                    ..ShmConfig::default()
                                }
                                .path(),
                            );
                            result?
                        }
                        Backend::Udp => measure_transport(
                            open_udp(&endpoint)?,
                            &endpoint,
                            size,
                            batch,
                            options.seconds,
                        )?,
                    };
                    rates.push(rate);
                    drops.push(dropped);
                }
                let rate = median(rates);
                let name = match backend {
                    Backend::Shm => "shm fabric",
                    Backend::Udp => "udp loopback",
                };
                println!(
                    "| {name} | {size} | {batch} | {:.2} | {:.0}% | {:.0}% |",
                    rate / 1e6,
                    100.0 * rate / ring,
                    100.0 * median(drops)
                );
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    match &options.command {
        Command_::Peer(peer_options) => peer(peer_options),
        Command_::Bench(bench_options) => bench(bench_options),
        Command_::SealBench(seal_options) => seal_bench(seal_options),
        Command_::RingRate(ring_options) => ring_rate(ring_options),
        Command_::RingPingpong(pingpong_options) => ring_pingpong(pingpong_options),
    }
}
