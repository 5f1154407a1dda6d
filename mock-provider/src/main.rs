//! Mock OpenAI-compatible provider: a stand-in upstream for Tollgate's tests, demos and
//! benchmarks. Never for production. See docs/mock-provider.md.

mod account;
mod anthropic;
mod config;
mod control;
mod http;
mod ids;
mod log;
mod openai;
mod responses;
mod router;
mod rules;
mod server;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use server::Role;

/// Connection threads only parse and format small bodies; serde_json caps nesting at 128.
const THREAD_STACK: usize = 512 * 1024;

fn bind(what: &str, addr: &str) -> Result<(TcpListener, SocketAddr), ExitCode> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        eprintln!("mock-provider: cannot listen on {addr} ({what}): {e}");
        ExitCode::FAILURE
    })?;
    let local = listener.local_addr().map_err(|e| {
        eprintln!("mock-provider: no local address ({what}): {e}");
        ExitCode::FAILURE
    })?;
    Ok((listener, local))
}

fn accept_loop(listener: TcpListener, state: Arc<router::State>, role: Role) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let state = Arc::clone(&state);
                // If no thread can be spawned the connection is dropped: the client sees a
                // reset and retries, which is better than serving it on the accept thread.
                let _ = thread::Builder::new()
                    .name("conn".into())
                    .stack_size(THREAD_STACK)
                    .spawn(move || server::serve(stream, state, role));
            }
            // Typically EMFILE under load: back off instead of spinning.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn run(cfg: config::Config) -> Result<(), ExitCode> {
    let (listener, addr) = bind("provider", &cfg.listen)?;
    let control = cfg
        .control
        .as_deref()
        .map(|c| bind("control", c))
        .transpose()?;
    // Tests read these lines to learn the ports; nothing else is ever written to stdout.
    let mut lines = format!("listening on {addr}\n");
    if let Some((_, c)) = &control {
        lines.push_str(&format!("control on {c}\n"));
    }
    {
        let mut out = std::io::stdout().lock();
        if out
            .write_all(lines.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            eprintln!("mock-provider: {} (stdout unavailable)", lines.trim_end());
        }
    }

    let state = Arc::new(router::State::new(cfg));
    if let Some((control, _)) = control {
        let state = Arc::clone(&state);
        thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(control, state, Role::Control))
            .map_err(|e| {
                eprintln!("mock-provider: cannot start the control listener: {e}");
                ExitCode::FAILURE
            })?;
    }
    accept_loop(listener, state, Role::Provider);
    Ok(())
}

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
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}
