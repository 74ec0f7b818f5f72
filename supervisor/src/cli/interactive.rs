//! `flint exec -i` / `-it`: an interactive exec over an upgraded connection (agent-protocol frames both ways),
//! with the local terminal in raw mode for a tty.
use flint_agent::protocol::{ExecRequest, TtySize};

use super::CliError;

/// The local terminal in raw mode while this lives (the guest's terminal then does echo and line editing).
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> std::io::Result<RawMode> {
        // SAFETY: `termios` is plain data; tcgetattr fills it for fd 0, checked below.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into `saved`, which lives for the call.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw and tcsetattr only read and write the termios values passed.
        if unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw)
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read at entry on fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// This terminal's size (of stdout, else stdin).
fn term_size() -> Option<TtySize> {
    for fd in [1, 0] {
        // SAFETY: `winsize` is plain data; TIOCGWINSZ writes it for a terminal fd and fails otherwise.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `ws` lives for the call.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some(TtySize { rows: ws.ws_row, cols: ws.ws_col });
        }
    }
    None
}

/// `flint exec -i` / `-it`: an interactive exec over an upgraded connection (agent-protocol frames both ways).
pub async fn exec(socket: &crate::http::Target, id: &str, mut req: ExecRequest, tty: bool) -> Result<i32, CliError> {
    use flint_agent::protocol::{kind, read_frame, write_frame, Frame, Request, Response};
    use std::io::{IsTerminal, Write};
    use tokio::io::AsyncWriteExt;
    if tty {
        if !std::io::stdin().is_terminal() {
            return Err(super::usage("-t needs a terminal on stdin (use -i alone to stream input from a pipe)"));
        }
        req.tty = Some(term_size().unwrap_or(TtySize { rows: 24, cols: 80 }));
    }
    req.stdin = true;
    let body = serde_json::to_vec(&req).map_err(|e| super::usage(e.to_string()))?;
    let path = format!("/v1/vms/{}/exec", crate::client::enc(id));
    let up = crate::http::upgrade(socket, &path, &body, crate::api::EXEC_UPGRADE)
        .await
        .map_err(crate::client::ClientError::Connect)?;
    let (stream, early) = match up {
        crate::http::Upgrade::Switched { stream, early } => (stream, early),
        crate::http::Upgrade::Refused { status, body } => {
            let message = serde_json::from_slice::<crate::api::types::ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(crate::client::ClientError::Api { status, message }.into());
        }
    };
    let raw = match tty {
        true => Some(RawMode::enter().map_err(|source| CliError::Io { what: "raw mode".into(), source })?),
        false => None,
    };
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = tokio::io::AsyncReadExt::chain(std::io::Cursor::new(early), rd);
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Frame>(16);
    // Input: a plain thread (a blocking read of stdin must not hold up the runtime's exit).
    let input = out_tx.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = vec![0u8; 32 * 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = input.blocking_send(Frame::data(kind::EOF, 0, Vec::new()));
                    return;
                }
                Ok(n) => {
                    if input.blocking_send(Frame::data(kind::STDIN, 0, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let signals = out_tx.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut winch), Ok(mut int)) = (signal(SignalKind::window_change()), signal(SignalKind::interrupt()))
        else {
            return;
        };
        loop {
            let frame = tokio::select! {
                _ = winch.recv() => match term_size() {
                    Some(t) if tty => Frame::json(0, &Request::Resize { rows: t.rows, cols: t.cols }),
                    _ => continue,
                },
                // Without a tty ^C reaches this process, not the guest's terminal: pass it on.
                _ = int.recv() => Frame::json(0, &Request::Signal { signal: libc::SIGINT }),
            };
            if signals.send(frame).await.is_err() {
                return;
            }
        }
    });
    drop(out_tx);
    tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            if write_frame(&mut wr, &f).await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
    });
    let result = loop {
        let f = match read_frame(&mut rd).await {
            Ok(f) => f,
            Err(e) => break Err(super::usage(format!("the exec's connection ended before its exit status: {e}"))),
        };
        match f.kind {
            kind::STDOUT => {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(&f.payload).and_then(|_| o.flush());
            }
            kind::STDERR => {
                let mut e = std::io::stderr().lock();
                let _ = e.write_all(&f.payload).and_then(|_| e.flush());
            }
            kind::JSON => match serde_json::from_slice::<Response>(&f.payload) {
                Ok(Response::Exit { code, signal, timed_out, .. }) => {
                    if timed_out {
                        eprintln!("flint: the command timed out");
                    }
                    break Ok(code.unwrap_or(128 + signal.unwrap_or(0)));
                }
                Ok(Response::Error { message, .. }) => break Err(super::usage(message)),
                _ => {}
            },
            _ => {}
        }
    };
    drop(raw);
    result
}
