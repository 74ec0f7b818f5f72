//! A long call's progress for a person at a terminal: a spinner line with what is happening and the elapsed
//! time, left as a one-line summary when done. Quiet when asked (`--json`) or when stderr is not a terminal.
use std::future::Future;
use std::time::Duration;

/// Runs `call`; while it runs, every 500 ms `phase` may say what is happening (shown after `label`).
pub async fn with_progress<T, E, P, PF>(
    label: String,
    show: bool,
    call: impl Future<Output = Result<T, E>>,
    mut phase: P,
) -> Result<T, E>
where
    P: FnMut() -> PF,
    PF: Future<Output = Option<String>>,
{
    use std::io::IsTerminal;
    if !show || !std::io::stderr().is_terminal() {
        return call.await;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(label.clone());
    bar.enable_steady_tick(Duration::from_millis(120));
    tokio::pin!(call);
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let result = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = poll.tick() => {
                if let Some(p) = phase().await {
                    bar.set_message(format!("{label}: {p}"));
                }
            }
        }
    };
    let secs = bar.elapsed().as_secs_f64();
    match &result {
        Ok(_) => bar.finish_with_message(format!("{label}: done in {secs:.1} s")),
        Err(_) => bar.finish_with_message(format!("{label}: failed after {secs:.1} s")),
    }
    result
}
