//! The one backoff every retry loop uses: backon's exponential delays with jitter (agents that
//! lost NATS together do not come back in step), without a limit on tries (a loop ends on its
//! own condition: shutdown, success).

use std::time::Duration;

use backon::BackoffBuilder;

/// Delays from `min` doubling up to `max`, each with up to as much again of jitter.
pub fn backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> + Send {
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The next delay of `b` (it never runs out).
pub fn next(b: &mut impl Iterator<Item = Duration>) -> Duration {
    b.next().unwrap_or(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_bound_and_never_run_out() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = backoff(min, max);
        let first = next(&mut b);
        assert!(first >= min && first <= 2 * min, "{first:?}");
        let later: Vec<Duration> = (0..40).map(|_| next(&mut b)).collect();
        assert!(later.iter().all(|d| *d <= 2 * max), "{later:?}");
        assert!(later[30..].iter().all(|d| *d >= max), "{later:?}");
    }
}
