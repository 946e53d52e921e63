//! `confab serve` and `confab proxy` (config, runtime, the server or the
//! proxy until a signal) and `confab reindex` (drop the search index and
//! index every stored message, with a progress line).

use confab::{backup, server, telemetry};

use std::process::ExitCode;

use super::output::progress_bar;
use crate::{ConfigLayers, StoreArgs, load_config, runtime};

/// `confab reindex`: drop the search index and index every stored message,
/// with a progress line on stderr.
pub(crate) fn run_reindex(args: StoreArgs) -> ExitCode {
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let dir = &config.server.data_dir;
    let result = (|| -> Result<u64, String> {
        let store = confab::store::Store::open_with(
            dir,
            config.store.cache_mb << 20,
            Some(&backup::before_migration(dir)),
        )
        .map_err(|e| format!("{e} (is a server running on this data directory?)"))?;
        confab::search::SearchIndex::remove(dir)?;
        let total = store.feed.committed();
        let index = std::sync::Arc::new(confab::search::SearchIndex::open(dir, total)?);
        let indexer = confab::search::Indexer::new(
            index,
            std::sync::Arc::new(store),
            std::time::Duration::from_secs(5),
        );
        let started = std::time::Instant::now();
        let mut last = std::time::Instant::now() - std::time::Duration::from_secs(1);
        let n = indexer.catch_up(|done, total| {
            if last.elapsed().as_millis() >= 200 || done == total {
                last = std::time::Instant::now();
                progress_bar("indexing", done, total, "");
            }
        })?;
        let secs = started.elapsed().as_secs_f64();
        eprintln!();
        eprintln!(
            "indexed {n} messages in {secs:.1} s ({:.0} messages/s)",
            n as f64 / secs.max(1e-9)
        );
        Ok(n)
    })();
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("confab: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn run_serve(args: &impl ConfigLayers, proxy: bool) -> ExitCode {
    let config = match load_config(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.server.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.server.log_format == "json" {
        logs.json().with_current_span(true).init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let handle = match telemetry::install() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("confab: cannot set up metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let builder = match config.cluster.proxy_threads {
        1 if proxy => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if proxy && n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    let runtime = match runtime(builder) {
        Ok(r) => r,
        Err(code) => return code,
    };
    // What a proxy reads again on SIGHUP (its node list): the same layers.
    let reload = || {
        args.overrides()
            .and_then(|ov| confab::config::Config::load(&ov).map_err(|e| e.to_string()))
    };
    let run = async {
        if proxy {
            confab::proxy::serve(config, handle, reload).await
        } else {
            server::serve(config, handle).await
        }
    };
    let result = runtime.block_on(run);
    // Threads of the blocking pool still waiting (on a storage that does
    // not answer) do not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("confab: {e}");
            ExitCode::FAILURE
        }
    }
}
