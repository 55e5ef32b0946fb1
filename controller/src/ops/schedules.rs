//! Backup schedules: a cron pattern per instance (UTC; five fields, or six with seconds), run by
//! the leader's timers, with a full/incremental mix and retention.
//!
//! A run is due when `next_run_ms` has passed. It starts a backup through the same path as
//! `POST /backups` ([`super::backups::create`]), which moves `next_run_ms` to the pattern's next
//! time after *now* in the transaction that records the backup: a run happens once, a controller
//! that was down across several due times starts one run when it is back, and a run whose
//! instance is still taking a backup (or is busy, or over quota) is skipped with the reason in
//! `last_result` — runs never overlap.
//!
//! Retention removes the schedule's own completed backups that are past `keep_last` (the newest
//! N kept) and older than `keep_days` (with both set, a backup goes only when both say so), never
//! one that a kept backup builds on, and never another backup.

use std::collections::HashSet;

use croner::parser::{CronParser, Seconds};
use croner::Cron;
use tracing::{info, warn};

use super::backups::{self, BackupSpec, ScheduleRun};
use super::Caller;
use crate::error::ApiError;
use crate::status::BackupStatus;
use crate::store::{self, ScheduleRow};
use crate::App;

/// Parses a schedule's pattern (400 with what is wrong).
pub fn parse(pattern: &str) -> Result<Cron, ApiError> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(pattern)
        .map_err(|e| {
            ApiError::bad_request(format!(
                "pattern '{pattern}' is not a cron pattern ({e}); e.g. '0 3 * * *' runs at 03:00 UTC every day."
            ))
        })
}

/// The first time the pattern matches strictly after `after_ms` (Unix ms), if any.
pub fn next_after(cron: &Cron, after_ms: i64) -> Option<i64> {
    let after = chrono::DateTime::from_timestamp_millis(after_ms)?;
    cron.find_next_occurrence(&after, false)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Now, Unix ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What a schedule's next run takes, from its own backups (`mine`, newest first): `None` for a
/// full backup, or the backup an incremental builds on. A full comes first, then `full_every - 1`
/// incrementals each on the one before, then a full again. Runs that were skipped (the previous
/// backup still running) and backups that failed do not count, so the mix holds however the runs
/// fall.
pub fn next_parent(full_every: i64, mine: &[store::BackupRow]) -> Option<String> {
    let mut chain = mine.iter().filter(|b| b.status != BackupStatus::Failed);
    let newest = chain.next()?;
    if full_every <= 1 || newest.status != BackupStatus::Completed {
        return None;
    }
    // Backups since (and including) the newest full one.
    let mut taken = 1;
    let mut b = newest;
    while b.parent_id.is_some() {
        taken += 1;
        b = chain.next()?;
    }
    (taken < full_every).then(|| newest.id.clone())
}

/// Schedules one instance may have.
pub const PER_INSTANCE: usize = 5;

/// A schedule as the API parsed it.
pub struct ScheduleSpec {
    pub instance: String,
    pub name: String,
    pub pattern: String,
    pub full_every: i64,
    pub keep_last: Option<i64>,
    pub keep_days: Option<i64>,
    /// Tiers: the newest backup of each of the last N days, ISO weeks, months.
    pub keep_daily: Option<i64>,
    pub keep_weekly: Option<i64>,
    pub keep_monthly: Option<i64>,
    /// Its runs are restore drills (`workflow::drill`) instead of backups.
    pub drill: bool,
}

/// Creates a schedule: the instance must be the caller's, the pattern valid, the datastore able
/// to take incrementals when the mix asks for them; its first run is the pattern's next time.
pub async fn create(app: &App, c: &Caller, spec: ScheduleSpec) -> Result<ScheduleRow, ApiError> {
    let Some(cfg) = app.cfg.backup.as_ref() else {
        return Err(ApiError::unprocessable(
            "Backups are not configured on this deployment ([backup] in the controller config).",
        ));
    };
    let r = super::find_instance(app, c, &spec.instance).await?;
    let cron = parse(&spec.pattern)?;
    let next = next_after(&cron, now_ms()).ok_or_else(|| {
        ApiError::bad_request(format!("pattern '{}' never matches again.", spec.pattern))
    })?;
    let datastore = super::datastore(app, &r).await?;
    let row = ScheduleRow {
        id: uuid::Uuid::new_v4().to_string(),
        project_id: r.project_id.clone(),
        instance_id: r.id.clone(),
        name: spec.name,
        pattern: spec.pattern,
        full_every: spec.full_every,
        keep_last: spec.keep_last,
        keep_days: spec.keep_days,
        next_run_ms: next,
        runs: 0,
        last_run: None,
        last_result: None,
        created: store::now(),
        kind: if spec.drill { "drill" } else { "backup" }.into(),
        keep_daily: spec.keep_daily,
        keep_weekly: spec.keep_weekly,
        keep_monthly: spec.keep_monthly,
    };
    if row.drills() && (row.full_every != 1 || row.retains()) {
        return Err(ApiError::bad_request(
            "A drill schedule takes no full_every and no keep_* retention: it restores the latest backup and keeps nothing.",
        ));
    }
    match coffer_proto::datastore::BackupMethod::for_datastore(datastore, cfg.strategy) {
        None => {
            return Err(ApiError::bad_request(format!(
                "Backups of {datastore} instances are not supported."
            )))
        }
        Some(k) if row.full_every > 1 && !k.incremental() => {
            return Err(ApiError::bad_request(format!(
                "The backup strategy for {datastore} ({}) takes full backups only; omit full_every or set it to 1.",
                k.name()
            )))
        }
        Some(_) => {}
    }
    let mine = app
        .store
        .schedules_of(&r.project_id)
        .await?
        .into_iter()
        .filter(|s| s.instance_id == r.id)
        .count();
    if mine >= PER_INSTANCE {
        return Err(ApiError::over_limit(format!(
            "Instance {} has {PER_INSTANCE} backup schedules already; delete one first.",
            r.id
        )));
    }
    app.store.insert_schedule(&row).await?;
    Ok(row)
}

/// A schedule of the caller's project (any for an admin), or 404.
pub async fn find(app: &App, c: &Caller, id: &str) -> Result<ScheduleRow, ApiError> {
    match app.store.schedule(id).await? {
        Some(s) if s.project_id == c.project || c.admin => Ok(s),
        _ => Err(ApiError::not_found(format!(
            "Backup schedule {id} could not be found."
        ))),
    }
}

/// Starts the runs that are due (the leader's timers call this every second).
/// Returns the due drill schedules, each with its next run, for the drill workflows
/// (`workflow::drill::run_due`), which this layer does not start.
pub async fn run_due(app: &App) -> Vec<(ScheduleRow, i64)> {
    let now = now_ms();
    let Ok(due) = app.store.due_schedules(now).await else {
        return vec![];
    };
    let mut drills = vec![];
    for s in due {
        // A pattern that never matches again (a date passed) stops the schedule's runs.
        let next = parse(&s.pattern)
            .ok()
            .and_then(|c| next_after(&c, now))
            .unwrap_or(i64::MAX);
        if s.drills() {
            drills.push((s, next));
        } else {
            run(app, &s, next).await;
        }
    }
    drills
}

async fn run(app: &App, s: &ScheduleRow, next: i64) {
    let c = Caller::project(&s.project_id);
    let spec = |parent_id: Option<String>| BackupSpec {
        name: format!("{} {}", s.name, store::now()),
        description: Some(format!("Taken by backup schedule {}", s.id)),
        instance: s.instance_id.clone(),
        incremental: parent_id.is_some(),
        parent_id,
        schedule: Some(ScheduleRun {
            id: s.id.clone(),
            due_ms: s.next_run_ms,
            next_ms: next,
        }),
    };
    let mine = match app.store.backups_of_schedule(&s.id).await {
        Ok(mine) => mine,
        Err(e) => {
            warn!(schedule = %s.id, error = %e, "the schedule's backups could not be read; run later");
            return;
        }
    };
    let parent = next_parent(s.full_every, &mine);
    let incremental = parent.is_some();
    let mut started = backups::create(app, &c, spec(parent)).await;
    if incremental
        && matches!(&started, Err(e) if e.status == axum::http::StatusCode::BAD_REQUEST
            || e.status == axum::http::StatusCode::NOT_FOUND)
    {
        // The parent is gone (deleted by hand since): a full one.
        started = backups::create(app, &c, spec(None)).await;
    }
    match started {
        Ok(b) => {
            info!(schedule = %s.id, instance = %s.instance_id, backup = %b.id, incremental, "scheduled backup started")
        }
        Err(e) if e.status == axum::http::StatusCode::NOT_FOUND => {
            info!(schedule = %s.id, instance = %s.instance_id, "the schedule's instance is gone; schedule removed");
            let _ = app.store.delete_schedule(&s.id).await;
        }
        // Another controller's run moved it first.
        Err(e) if e.status == axum::http::StatusCode::CONFLICT => {}
        Err(e) => {
            warn!(schedule = %s.id, instance = %s.instance_id, reason = %e.message, "scheduled backup skipped");
            let _ = app
                .store
                .advance_schedule(
                    &s.id,
                    s.next_run_ms,
                    next,
                    &format!("skipped: {}", e.message),
                )
                .await;
        }
    }
}

/// Which of a schedule's backups (newest first) retention removes: completed ones that no rule
/// keeps — not among the newest `keep_last`, not younger than `keep_days`, not the newest of
/// one of the last `keep_daily` days, `keep_weekly` ISO weeks or `keep_monthly` months that
/// have a backup (UTC) — and that no backup staying builds on (`all`: every live backup of the
/// instance). Nothing goes when no rule is set.
pub fn expired(
    s: &ScheduleRow,
    mine: &[store::BackupRow],
    all: &[store::BackupRow],
) -> Vec<String> {
    let tiers = [
        (s.keep_daily, Period::Day),
        (s.keep_weekly, Period::Week),
        (s.keep_monthly, Period::Month),
    ];
    if !s.retains() {
        return vec![];
    }
    let done: Vec<&store::BackupRow> = mine
        .iter()
        .filter(|b| b.status == BackupStatus::Completed)
        .collect();
    let mut kept: HashSet<&str> = HashSet::new();
    for (i, b) in done.iter().enumerate() {
        let by_last = s.keep_last.is_some_and(|n| (i as i64) < n);
        let by_days = s
            .keep_days
            .is_some_and(|d| store::age_secs(&b.created) <= d * 86_400);
        if by_last || by_days {
            kept.insert(&b.id);
        }
    }
    // Each tier: newest first, the first backup of each new period, for N periods.
    for (n, period) in tiers {
        let Some(n) = n else { continue };
        let mut seen: Vec<String> = vec![];
        for b in &done {
            let p = period.of(&b.created);
            if !seen.contains(&p) {
                if seen.len() as i64 >= n {
                    break;
                }
                seen.push(p);
                kept.insert(&b.id);
            }
        }
    }
    let mut gone: HashSet<String> = done
        .iter()
        .filter(|b| !kept.contains(b.id.as_str()))
        .map(|b| b.id.clone())
        .collect();
    // A backup that one staying builds on stays too (to a fixpoint: chains are short).
    loop {
        let needed: Vec<String> = all
            .iter()
            .filter(|b| !gone.contains(&b.id))
            .filter_map(|b| b.parent_id.clone())
            .filter(|p| gone.contains(p))
            .collect();
        if needed.is_empty() {
            break;
        }
        for p in needed {
            gone.remove(&p);
        }
    }
    mine.iter()
        .filter(|b| gone.contains(&b.id))
        .map(|b| b.id.clone())
        .collect()
}

/// A retention tier's period.
#[derive(Clone, Copy)]
enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    /// The period a `created` time (`YYYY-MM-DDTHH:MM:SS`, UTC) falls in.
    fn of(self, created: &str) -> String {
        match self {
            Period::Day => created.get(..10).unwrap_or(created).to_string(),
            Period::Month => created.get(..7).unwrap_or(created).to_string(),
            Period::Week => {
                chrono::NaiveDate::parse_from_str(created.get(..10).unwrap_or(created), "%Y-%m-%d")
                    .map(|d| {
                        let w = chrono::Datelike::iso_week(&d);
                        format!("{}-W{:02}", w.year(), w.week())
                    })
                    .unwrap_or_else(|_| created.to_string())
            }
        }
    }
}

/// Applies every schedule's retention (the leader's timers call this every few seconds).
pub async fn retain(app: &App) {
    let Ok(schedules) = app.store.all_schedules().await else {
        return;
    };
    for s in schedules {
        if !s.retains() {
            continue;
        }
        let Ok(mine) = app.store.backups_of_schedule(&s.id).await else {
            continue;
        };
        let Ok(mut all) = app.store.backups_of(&s.project_id).await else {
            continue;
        };
        all.retain(|b| b.instance_id == s.instance_id);
        for id in expired(&s, &mine, &all) {
            match backups::remove(app, &id).await {
                Ok(()) => {
                    info!(schedule = %s.id, backup = %id, "backup past the schedule's retention removed")
                }
                Err(e) => {
                    warn!(schedule = %s.id, backup = %id, error = %format!("{e:#}"), "removing a backup past retention failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_and_their_next_times() {
        let daily = parse("0 3 * * *").unwrap();
        // 2026-12-01T12:00:00Z → 2026-12-02T03:00:00Z
        let t = 1_796_126_400_000;
        assert_eq!(next_after(&daily, t), Some(t + 15 * 3_600_000));
        let every5s = parse("*/5 * * * * *").unwrap();
        assert_eq!(next_after(&every5s, t), Some(t + 5_000));
        assert_eq!(next_after(&every5s, t + 1), Some(t + 5_000));
        let e = parse("61 * * * *").unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("'61 * * * *'"), "{}", e.message);
        assert!(parse("every day").is_err());
    }

    #[test]
    fn the_mix_follows_the_schedules_own_chain() {
        let b = |id: &str, parent: Option<&str>, status| store::BackupRow {
            status,
            ..backup(id, parent, "2026-01-01T00:00:00")
        };
        use BackupStatus::*;
        // Nothing yet, or only failures: a full.
        assert_eq!(next_parent(3, &[]), None);
        assert_eq!(next_parent(3, &[b("x", None, Failed)]), None);
        // Newest first. After a full: incrementals on the one before, until full_every.
        let full = [b("f", None, Completed)];
        assert_eq!(next_parent(3, &full).as_deref(), Some("f"));
        assert_eq!(next_parent(1, &full), None);
        let one = [b("i1", Some("f"), Completed), b("f", None, Completed)];
        assert_eq!(next_parent(3, &one).as_deref(), Some("i1"));
        assert_eq!(next_parent(2, &one), None);
        let two = [
            b("i2", Some("i1"), Completed),
            b("i1", Some("f"), Completed),
            b("f", None, Completed),
        ];
        assert_eq!(next_parent(3, &two), None);
        // A failed backup does not count; a running one is waited for (the run is skipped).
        let failed = [b("x", Some("f"), Failed), b("f", None, Completed)];
        assert_eq!(next_parent(3, &failed).as_deref(), Some("f"));
        assert_eq!(next_parent(3, &[b("r", None, Building)]), None);
        // A chain whose full retention or a user removed: a full.
        assert_eq!(next_parent(5, &[b("i1", Some("f"), Completed)]), None);
    }

    fn backup(id: &str, parent: Option<&str>, created: &str) -> store::BackupRow {
        store::BackupRow {
            id: id.into(),
            project_id: "p".into(),
            instance_id: "i".into(),
            name: id.into(),
            description: None,
            status: BackupStatus::Completed,
            parent_id: parent.map(Into::into),
            datastore_version_id: "v".into(),
            size_bytes: None,
            checksum: None,
            location: None,
            progress: String::new(),
            fault: None,
            intent_id: None,
            key_id: None,
            created: created.into(),
            updated: created.into(),
            archive_since_ms: None,
            completed_ms: None,
            inventory: None,
            change_file: None,
        }
    }

    fn schedule(keep_last: Option<i64>, keep_days: Option<i64>) -> ScheduleRow {
        ScheduleRow {
            id: "s".into(),
            project_id: "p".into(),
            instance_id: "i".into(),
            name: "nightly".into(),
            pattern: "0 3 * * *".into(),
            full_every: 2,
            keep_last,
            keep_days,
            next_run_ms: 0,
            runs: 0,
            last_run: None,
            last_result: None,
            created: "2026-01-01T00:00:00".into(),
            kind: "backup".into(),
            keep_daily: None,
            keep_weekly: None,
            keep_monthly: None,
        }
    }

    #[test]
    fn tiers_keep_the_newest_of_each_recent_day_week_and_month() {
        // Newest first, all full backups.
        let mine = vec![
            backup("d3b", None, "2026-03-03T20:00:00"),
            backup("d3a", None, "2026-03-03T08:00:00"),
            backup("d2", None, "2026-03-02T08:00:00"), // Monday of ISO week 10
            backup("d1", None, "2026-03-01T08:00:00"), // Sunday, ISO week 9
            backup("f20", None, "2026-02-20T08:00:00"),
            backup("j31", None, "2026-01-31T08:00:00"),
            backup("j02", None, "2026-01-02T08:00:00"),
        ];
        let tiered = |d, w, m| ScheduleRow {
            keep_daily: d,
            keep_weekly: w,
            keep_monthly: m,
            ..schedule(None, None)
        };
        // The newest of each of the last two days with a backup.
        assert_eq!(
            expired(&tiered(Some(2), None, None), &mine, &mine),
            ["d3a", "d1", "f20", "j31", "j02"]
        );
        // The newest of each of the last two ISO weeks: d3b (week 10), d1 (week 9).
        assert_eq!(
            expired(&tiered(None, Some(2), None), &mine, &mine),
            ["d3a", "d2", "f20", "j31", "j02"]
        );
        // The newest of each of the last three months: d3b, f20, j31.
        assert_eq!(
            expired(&tiered(None, None, Some(3)), &mine, &mine),
            ["d3a", "d2", "d1", "j02"]
        );
        // Tiers add up with keep_last: one of each.
        let both = ScheduleRow {
            keep_last: Some(2),
            ..tiered(Some(1), None, Some(2))
        };
        assert_eq!(expired(&both, &mine, &mine), ["d2", "d1", "j31", "j02"]);
    }

    #[test]
    fn retention_keeps_the_newest_and_what_they_build_on() {
        let old = "2020-01-01T00:00:00";
        // Newest first: d (incremental on c), c (full), b (incremental on a), a (full).
        let mine = vec![
            backup("d", Some("c"), old),
            backup("c", None, old),
            backup("b", Some("a"), old),
            backup("a", None, old),
        ];
        // Keep one: d stays, so c (its parent) stays; b and a go.
        assert_eq!(expired(&schedule(Some(1), None), &mine, &mine), ["b", "a"]);
        // Keep three: b stays, so a stays.
        assert!(expired(&schedule(Some(3), None), &mine, &mine).is_empty());
        // A manual incremental on a (not the schedule's) keeps a.
        let mut all = mine.clone();
        all.push(backup("m", Some("a"), old));
        assert_eq!(expired(&schedule(Some(1), None), &mine, &all), ["b"]);
        // By age: recent backups stay whatever keep_last says.
        let recent = store::now();
        let fresh = vec![backup("y", None, &recent), backup("x", None, &recent)];
        assert!(expired(&schedule(Some(1), Some(7)), &fresh, &fresh).is_empty());
        assert_eq!(expired(&schedule(None, Some(7)), &mine, &mine).len(), 4);
        // No retention set: nothing goes.
        assert!(expired(&schedule(None, None), &mine, &mine).is_empty());
    }
}
