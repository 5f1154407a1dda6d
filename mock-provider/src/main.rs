//! Mock OpenAI-compatible provider: a stand-in upstream for Tollgate's tests, demos and
//! benchmarks. Never for production. See docs/mock-provider.md.

mod config;
mod http;
mod ids;
mod log;
mod openai;
mod router;
mod server;

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Connection threads only parse and format small bodies; serde_json caps nesting at 128.
const THREAD_STACK: usize = 512 * 1024;

fn main() -> ExitCode {
    let cfg = match config::parse(std::env::args().skip(1)) {
        Ok(config::Command::Run(cfg)) => cfg,
        Ok(config::Command::Help) => {
            print!("{}", config::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("mock-provider: {msg}\n\n{}", config::USAGE);
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(&cfg.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mock-provider: cannot listen on {}: {e}", cfg.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mock-provider: no local address: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Tests wait for this exact line to learn the port; it is the only thing on stdout.
    {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "listening on {addr}")
            .and_then(|()| out.flush())
            .is_err()
        {
            eprintln!("mock-provider: listening on {addr} (stdout unavailable)");
        }
    }

    let state = Arc::new(router::State::new(cfg));
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let state = Arc::clone(&state);
                // If no thread can be spawned the connection is dropped: the client sees a
                // reset and retries, which is better than serving it on the accept thread.
                let _ = thread::Builder::new()
                    .name("conn".into())
                    .stack_size(THREAD_STACK)
                    .spawn(move || server::serve(stream, state));
            }
            // Typically EMFILE under load: back off instead of spinning.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
    ExitCode::SUCCESS
}
