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

/// One source of a lineage: a period of its archive, and the position it took over at (empty
/// for the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub period: PeriodRow,
    pub took_over_at: String,
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
    if next.first_position.is_empty() || h.position.is_empty() {
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

/// The current period of `inst` (as its row says, when no period is recorded yet).
async fn current(app: &App, inst: &InstanceRow) -> anyhow::Result<Option<PeriodRow>> {
    let Some(since) = inst.archive_since_ms else {
        return Ok(None);
    };
    let periods = app.store.archive_periods(&inst.id).await?;
    Ok(Some(
        periods
            .into_iter()
            .find(|p| p.since_ms == since)
            .unwrap_or(PeriodRow {
                instance_id: inst.id.clone(),
                since_ms: since,
                latest_ms: inst.archive_latest_ms.unwrap_or(0),
                first_position: String::new(),
                last_position: String::new(),
            }),
    ))
}

/// The lineage ending with `inst`'s current period, oldest source first (empty: `inst` does
/// not archive).
pub async fn back(app: &App, inst: &InstanceRow, ds: Datastore) -> anyhow::Result<Vec<Member>> {
    let Some(mut at) = current(app, inst).await? else {
        return Ok(vec![]);
    };
    let mut out = vec![];
    for _ in 0..MAX_SOURCES {
        let into = app.store.handovers_into(&at.instance_id).await?;
        let periods = app.store.archive_periods(&at.instance_id).await?;
        let h = into
            .iter()
            .rev()
            .find(|h| h.at_ms <= at.since_ms)
            .filter(|h| opened_by(&periods, h, &into).is_some_and(|p| p.since_ms == at.since_ms))
            .cloned();
        let prev = match &h {
            Some(h) if app.store.instance(&h.from_instance).await?.is_some() => {
                let before = app.store.archive_periods(&h.from_instance).await?;
                period_at(&before, h.at_ms)
                    .filter(|p| joins(ds, p, h, &at))
                    .cloned()
            }
            _ => None,
        };
        out.push(Member {
            period: at,
            took_over_at: h.as_ref().map(|h| h.position.clone()).unwrap_or_default(),
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
    let mut out = vec![Member {
        period: first,
        took_over_at: String::new(),
    }];
    while out.len() < MAX_SOURCES {
        let at = &out.last().unwrap().period;
        if at.latest_ms >= t {
            break;
        }
        let periods = app.store.archive_periods(&at.instance_id).await?;
        let away = app.store.handovers_from(&at.instance_id).await?;
        let Some(h) = away.into_iter().find(|h| {
            h.at_ms >= at.since_ms
                && period_at(&periods, h.at_ms).is_some_and(|p| p.since_ms == at.since_ms)
        }) else {
            break;
        };
        if app.store.instance(&h.instance_id).await?.is_none() {
            break;
        }
        let into = app.store.handovers_into(&h.instance_id).await?;
        let next_periods = app.store.archive_periods(&h.instance_id).await?;
        let Some(next) = opened_by(&next_periods, &h, &into).cloned() else {
            break;
        };
        if !joins(ds, at, &h, &next) {
            break;
        }
        out.push(Member {
            period: next,
            took_over_at: h.position.clone(),
        });
    }
    Ok(out)
}

/// The recovery window of `inst` (Unix ms): from the completion of the first backup any source
/// of its lineage took that its archive covers, to its own latest restorable time.
pub async fn window(app: &App, inst: &InstanceRow) -> anyhow::Result<Option<(i64, i64)>> {
    Ok(window_and_sources(app, inst).await?.0)
}

/// [`window`], and the sources whose archives it spans, oldest first.
pub async fn window_and_sources(
    app: &App,
    inst: &InstanceRow,
) -> anyhow::Result<(Option<(i64, i64)>, Vec<String>)> {
    let Some(latest) = inst.archive_latest_ms else {
        return Ok((None, vec![]));
    };
    let ds = crate::ops::datastore(app, inst)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let mut earliest: Option<i64> = None;
    let mut sources: Vec<String> = vec![];
    for m in back(app, inst, ds).await? {
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
        }
    }
    let window = earliest.filter(|e| latest >= *e).map(|e| (e, latest));
    if window.is_none() {
        sources.clear();
    }
    Ok((window, sources))
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
