//! The command line of `confab bench`.

use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// The server to drive.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Connected users (one WebSocket each), for a single step.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Total messages per second over all senders, for a single step.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Seconds of sending per step.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Users per room: 2 = direct chats between pairs, more = groups.
    #[arg(long, default_value_t = 2)]
    pub room_size: usize,
    /// `seed`: users 100, 500, 1000, 2500, 5000 × rates 100, 500, 1000, 2500, 5000.
    #[arg(long)]
    pub steps: Option<String>,
    /// Open N idle authenticated connections and report server memory per connection.
    #[arg(long)]
    pub idle: Option<usize>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report with charts to this file.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100)]
    pub text_bytes: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1..=N).
    #[arg(long, default_value_t = 16)]
    pub source_ips: u8,
    /// Username prefix for the seeded users.
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// Seconds to wait after the last send for outstanding acks and deliveries.
    #[arg(long, default_value_t = 5)]
    pub drain: u64,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}
