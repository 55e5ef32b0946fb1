//! The lineage of an instance's archive: the sources before it, each joined to the next at
//! the position the next one took over at (a switchover or a failover). A restore starts from
//! a backup of any source in the lineage and replays each archive in turn: the recovery window
//! spans the change of source as long as the archives join without a gap.
//!
//! An archive *period* is a continuous stretch of one instance's archive (a new one after a
//! hole, or when a source that became a replica is a source again). A handover from A to B at
//! position H, recorded before B was promoted, ends A's period (the last one begun before it)
//! and opens B's (the first one begun after it); they join when B's archive starts at most one
//! transaction after what A's archive has of the stream up to H.

use coffer_proto::Datastore;

use crate::store::{HandoverRow, InstanceRow, PeriodRow};
use crate::App;

/// How many sources back a lineage is followed.
const MAX_SOURCES: usize = 32;

/// One source of a lineage: a period of its archive, and the position it took over at and
/// when (empty and 0 for the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub period: PeriodRow,
    pub took_over_at: String,
    pub at_ms: i64,
}

/// Until when each member's archive places writes (Unix ms): its latest restorable time, and
/// for all but the last no later than the handover away from it (an old source still looks at
/// its files, unchanged, until it is re-pointed, while the new one takes the writes).
pub fn covers(members: &[Member]) -> Vec<i64> {
    members
        .iter()
        .enumerate()
        .map(|(i, m)| match members.get(i + 1) {
            Some(next) => m.period.latest_ms.min(next.at_ms),
            None => m.period.latest_ms,
        })
        .collect()
}

/// The period of `periods` (oldest first) that was running at `t`: the last one begun by then.
fn period_at(periods: &[PeriodRow], t: i64) -> Option<&PeriodRow> {
    periods.iter().rev().find(|p| p.since_ms <= t)
}

/// The period `h` opened among `periods` of its new source (oldest first): the first one begun
/// after it, if no later handover into the same instance came first.
fn opened_by<'a>(
    periods: &'a [PeriodRow],
    h: &HandoverRow,
    into: &[HandoverRow],
) -> Option<&'a PeriodRow> {
    let p = periods.iter().find(|p| p.since_ms >= h.at_ms)?;
    let later = into
        .iter()
        .any(|o| o.at_ms > h.at_ms && o.at_ms <= p.since_ms);
    (!later).then_some(p)
}

/// Whether `next`'s archive goes on from `prev`'s without a gap at handover `h`: what `prev`
/// holds of the stream up to the handover's position, then at most the one transaction after
/// it is where `next` starts.
pub fn joins(ds: Datastore, prev: &PeriodRow, h: &HandoverRow, next: &PeriodRow) -> bool {
    // A position of several streams (`a,b`) is not joined on: the archives' transactions of
    // different streams interleave.
    if next.first_position.is_empty() || h.position.is_empty() || h.position.contains(',') {
        return false;
    }
    let reach = if prev.last_position.is_empty() {
        return false;
    } else if ds.position_covers(&prev.last_position, &h.position) {
        h.position.as_str()
    } else {
        prev.last_position.as_str()
    };
    ds.position_behind(reach, &next.first_position) <= 1
}

/// The current period of `inst` among its `periods` (as its row says, when no period is
/// recorded yet).
fn current(inst: &InstanceRow, periods: &[PeriodRow]) -> Option<PeriodRow> {
    let since = inst.archive_since_ms?;
    Some(
        periods
            .iter()
            .find(|p| p.since_ms == since)
            .cloned()
            .unwrap_or(PeriodRow {
                instance_id: inst.id.clone(),
                since_ms: since,
                latest_ms: inst.archive_latest_ms.unwrap_or(0),
                first_position: String::new(),
                last_position: String::new(),
            }),
    )
}

/// The handover away from `period` (the first after it began, while it was the one running),
/// among its instance's `periods`.
async fn handover_out(
    app: &App,
    period: &PeriodRow,
    periods: &[PeriodRow],
) -> anyhow::Result<Option<HandoverRow>> {
    Ok(app
        .store
        .handovers_from(&period.instance_id)
        .await?
        .into_iter()
        .find(|h| {
            h.at_ms >= period.since_ms
                && period_at(periods, h.at_ms).is_none_or(|p| p.since_ms == period.since_ms)
        }))
}

/// `period` as a lineage's last member: a source that handed over places nothing after it
/// (its archive still looks at its unchanged files until it is re-pointed).
async fn capped(
    app: &App,
    mut period: PeriodRow,
    periods: &[PeriodRow],
) -> anyhow::Result<PeriodRow> {
    if let Some(h) = handover_out(app, &period, periods).await? {
        period.latest_ms = period.latest_ms.min(h.at_ms);
    }
    Ok(period)
}

/// The lineage ending with `inst`'s current period, oldest source first (empty: `inst` does
/// not archive).
pub async fn back(app: &App, inst: &InstanceRow, ds: Datastore) -> anyhow::Result<Vec<Member>> {
    if inst.archive_since_ms.is_none() {
        return Ok(vec![]);
    }
    // The periods of the member being looked at (read once per instance visited).
    let mut periods = app.store.archive_periods(&inst.id).await?;
    let Some(at) = current(inst, &periods) else {
        return Ok(vec![]);
    };
    let mut at = capped(app, at, &periods).await?;
    let mut out = vec![];
    for _ in 0..MAX_SOURCES {
        let into = app.store.handovers_into(&at.instance_id).await?;
        let h = into
            .iter()
            .rev()
            .find(|h| h.at_ms <= at.since_ms)
            .filter(|h| opened_by(&periods, h, &into).is_some_and(|p| p.since_ms == at.since_ms))
            .cloned();
        let prev = match &h {
            Some(h) if app.store.instance(&h.from_instance).await?.is_some() => {
                let before = app.store.archive_periods(&h.from_instance).await?;
                let p = period_at(&before, h.at_ms)
                    .filter(|p| joins(ds, p, h, &at))
                    .cloned();
                periods = before;
                p
            }
            _ => None,
        };
        out.push(Member {
            period: at,
            took_over_at: h.as_ref().map(|h| h.position.clone()).unwrap_or_default(),
            at_ms: h.as_ref().map_or(0, |h| h.at_ms),
        });
        match prev {
            Some(p) => at = p,
            None => break,
        }
    }
    out.reverse();
    // The first source's archive is replayed from a backup: no handover into it.
    if let Some(first) = out.first_mut() {
        first.took_over_at.clear();
        first.at_ms = 0;
    }
    Ok(out)
}

/// The lineage from `first` (a period of a source) forward through the sources that took over
/// after it, up to the first whose archive reaches `t` (Unix ms) or as far as the archives join.
pub async fn forward(
    app: &App,
    first: PeriodRow,
    ds: Datastore,
    t: i64,
) -> anyhow::Result<Vec<Member>> {
    // The periods of the last member (read once per instance visited).
    let mut periods = app.store.archive_periods(&first.instance_id).await?;
    let mut out = vec![Member {
        period: first,
        took_over_at: String::new(),
        at_ms: 0,
    }];
    while out.len() < MAX_SOURCES {
        let at = &out.last().unwrap().period;
        let Some(h) = handover_out(app, at, &periods).await? else {
            break;
        };
        // What this source placed ends at the handover.
        let until = at.latest_ms.min(h.at_ms);
        let next = if until >= t || app.store.instance(&h.instance_id).await?.is_none() {
            None
        } else {
            let into = app.store.handovers_into(&h.instance_id).await?;
            periods = app.store.archive_periods(&h.instance_id).await?;
            opened_by(&periods, &h, &into)
                .filter(|n| joins(ds, at, &h, n))
                .cloned()
        };
        let Some(next) = next else {
            out.last_mut().unwrap().period.latest_ms = until;
            break;
        };
        out.push(Member {
            period: capped(app, next, &periods).await?,
            took_over_at: h.position.clone(),
            at_ms: h.at_ms,
        });
    }
    Ok(out)
}

/// The stretches of time no archive of `members` places precisely (Unix ms, exclusive): from
/// a source's latest restorable time to the first time the next one's archive watched, when
/// the next one began later (a failover: the old source's last writes reached the new one, or
/// were lost, at times no archive saw).
pub fn gaps(members: &[Member]) -> Vec<(i64, i64)> {
    let covers = covers(members);
    members
        .iter()
        .zip(covers)
        .zip(members.iter().skip(1))
        .filter(|((_, until), next)| next.period.since_ms > *until)
        .map(|((_, until), next)| (until, next.period.since_ms))
        .collect()
}

/// Whether a source before `inst`'s current period in its lineage keeps a backup its archive
/// covers: restores from it read `inst`'s archive from where `inst` took over.
pub async fn serves_earlier_backups(app: &App, inst: &InstanceRow) -> anyhow::Result<bool> {
    let ds = crate::ops::datastore(app, inst)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let members = back(app, inst, ds).await?;
    for m in members.iter().take(members.len().saturating_sub(1)) {
        let p = &m.period;
        if app
            .store
            .earliest_covered(&p.instance_id, p.since_ms)
            .await?
            .is_some()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The recovery window of `inst` (Unix ms): from the completion of the first backup any source
/// of its lineage took that its archive covers, to its own latest restorable time.
pub async fn window(app: &App, inst: &InstanceRow) -> anyhow::Result<Option<(i64, i64)>> {
    Ok(window_and_sources(app, inst).await?.window)
}

/// A recovery window across sources.
#[derive(Debug, Default)]
pub struct Spanned {
    pub window: Option<(i64, i64)>,
    /// The sources whose archives it spans, oldest first.
    pub sources: Vec<String>,
    /// What inside it no archive places precisely ([`gaps`]).
    pub gaps: Vec<(i64, i64)>,
}

/// [`window`], the sources whose archives it spans and its gaps.
pub async fn window_and_sources(app: &App, inst: &InstanceRow) -> anyhow::Result<Spanned> {
    if inst.archive_latest_ms.is_none() {
        return Ok(Spanned::default());
    }
    let ds = crate::ops::datastore(app, inst)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let members = back(app, inst, ds).await?;
    let Some(latest) = members.last().map(|m| m.period.latest_ms) else {
        return Ok(Spanned::default());
    };
    let mut earliest: Option<i64> = None;
    let mut sources: Vec<String> = vec![];
    let mut spanned: Vec<Member> = vec![];
    for m in members {
        if let Some(e) = app
            .store
            .earliest_covered(&m.period.instance_id, m.period.since_ms)
            .await?
        {
            if earliest.is_none() {
                sources.clear();
            }
            earliest = Some(earliest.map_or(e, |x: i64| x.min(e)));
        }
        if earliest.is_some() {
            sources.push(m.period.instance_id.clone());
            spanned.push(m);
        }
    }
    let window = earliest.filter(|e| latest >= *e).map(|e| (e, latest));
    if window.is_none() {
        return Ok(Spanned::default());
    }
    Ok(Spanned {
        window,
        sources,
        gaps: gaps(&spanned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn period(id: &str, since: i64, first: &str, last: &str) -> PeriodRow {
        PeriodRow {
            instance_id: id.into(),
            since_ms: since,
            latest_ms: since + 100,
            first_position: first.into(),
            last_position: last.into(),
        }
    }

    fn handover(into: &str, from: &str, position: &str, at: i64) -> HandoverRow {
        HandoverRow {
            instance_id: into.into(),
            from_instance: from.into(),
            position: position.into(),
            at_ms: at,
        }
    }

    #[test]
    fn archives_join_when_the_next_one_starts_at_most_one_transaction_after() {
        // The datastore whose positions count transactions per stream (`domain-server-seq`).
        let ds = Datastore::ALL
            .into_iter()
            .find(|d| d.position_behind("0-1-1", "0-1-3") == 2)
            .unwrap();
        let h = handover("b", "a", "0-1-10", 500);
        // The old source stored everything up to the handover; the new one starts before it
        // (its binary log holds what it replicated) or right after it.
        let a = period("a", 0, "0-1-1", "0-1-10");
        assert!(joins(ds, &a, &h, &period("b", 600, "0-1-3", "0-2-20")));
        assert!(joins(ds, &a, &h, &period("b", 600, "0-2-11", "0-2-20")));
        assert!(!joins(ds, &a, &h, &period("b", 600, "0-2-12", "0-2-20")));
        // The old source died before storing its last transactions: the new one must hold them.
        let short = period("a", 0, "0-1-1", "0-1-7");
        assert!(joins(ds, &short, &h, &period("b", 600, "0-1-8", "0-2-20")));
        assert!(!joins(ds, &short, &h, &period("b", 600, "0-1-9", "0-2-20")));
        // A failover's lost transactions (the old source went past the handover) do not count.
        let ahead = period("a", 0, "0-1-1", "0-1-12");
        assert!(joins(ds, &ahead, &h, &period("b", 600, "0-2-11", "0-2-20")));
        assert!(!joins(
            ds,
            &ahead,
            &h,
            &period("b", 600, "0-2-13", "0-2-20")
        ));
        // Nothing known: no join (an archive that names no transactions).
        assert!(!joins(ds, &a, &h, &period("b", 600, "", "")));
        assert!(!joins(
            ds,
            &period("a", 0, "", ""),
            &h,
            &period("b", 600, "0-1-3", "")
        ));
    }

    #[test]
    fn a_failover_leaves_a_gap_a_switchover_does_not() {
        let m = |id: &str, at: i64, since: i64, latest: i64| Member {
            period: PeriodRow {
                latest_ms: latest,
                ..period(id, since, "", "")
            },
            took_over_at: String::new(),
            at_ms: at,
        };
        // The old source (fenced) watched until after the new one began: what it places counts
        // until the handover only.
        let switched = [m("a", 0, 0, 1000), m("b", 850, 900, 2000)];
        assert_eq!(covers(&switched), vec![850, 2000]);
        assert_eq!(gaps(&switched), vec![(850, 900)]);
        // A failover: the old source's archive stopped at 2000, the new one's began at 2400.
        let failed = [
            m("a", 0, 0, 1000),
            m("b", 900, 900, 2000),
            m("c", 2300, 2400, 3000),
        ];
        assert_eq!(gaps(&failed), vec![(2000, 2400)]);
    }

    #[test]
    fn a_handover_opens_the_first_period_after_it_and_ends_the_one_before() {
        let periods = vec![
            period("b", 100, "", ""),
            period("b", 700, "", ""),
            period("b", 900, "", ""),
        ];
        let h = handover("b", "a", "0-1-10", 500);
        assert_eq!(
            opened_by(&periods, &h, std::slice::from_ref(&h))
                .unwrap()
                .since_ms,
            700
        );
        // A later handover into b before that period began: the period is that one's.
        let h2 = handover("b", "c", "0-1-12", 650);
        assert!(opened_by(&periods, &h, &[h.clone(), h2]).is_none());
        assert_eq!(period_at(&periods, 800).unwrap().since_ms, 700);
        assert_eq!(period_at(&periods, 50), None);
    }
}
