//! Retention: which of one agent's snapshots `memsnap forget` keeps, and why. Pure decisions, no
//! I/O; the caller deletes what is not kept.
//!
//! The rules are restic's `forget --keep-*` rules. Snapshots are ordered newest first; at equal
//! times the greater id counts as newer, as `latest` resolves. Every rule keeps and none removes:
//! a snapshot kept by any rule stays, and its reasons name every rule that keeps it, in this order:
//!
//! - `pinned`: a pinned snapshot is always kept.
//! - `newest`: the agent's newest snapshot is always kept, whatever the policy.
//! - `last` (`keep_last` N): the N newest.
//! - `hourly`, `daily`, `weekly`, `monthly`, `yearly` (`keep_hourly` N, ...): walking newest to
//!   oldest, the first snapshot seen in each period is kept, until N periods have one. Only
//!   periods that hold a snapshot count: keep-monthly 6 reaches past a month without any. A week
//!   is an ISO 8601 week, Monday to Sunday, named by its ISO week-year: 2024-12-30 is in 2025-W01
//!   and 2027-01-01 in 2026-W53. Years and months are calendar ones.
//! - `within` (`keep_within` D): taken at most D before the agent's newest snapshot (not before
//!   now, so an agent that stopped long ago keeps its last stretch of history).
//! - `label L` (`keep_labels`): the snapshot's label is listed.
//!
//! Periods are UTC: the store records times as UTC milliseconds and has no time zone (restic
//! uses the local one). As in restic, a count or duration of 0 keeps nothing, and a policy of
//! nothing else is empty.

use serde::{Deserialize, Serialize};

use crate::time::{civil_from_days, days_from_civil};

const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_DAY: i64 = 24 * MS_PER_HOUR;

/// A retention policy; every rule keeps, none removes. An empty policy is refused by the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetentionPolicy {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// Keep snapshots taken within this many milliseconds before the agent's newest snapshot.
    pub keep_within_ms: Option<i64>,
    /// Keep snapshots whose label is one of these.
    pub keep_labels: Vec<String>,
}

impl RetentionPolicy {
    /// True when no rule would keep anything: every count and duration unset or 0, no labels.
    pub fn is_empty(&self) -> bool {
        let counts = [
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ];
        counts.iter().all(|n| n.unwrap_or(0) == 0)
            && self.keep_within_ms.unwrap_or(0) <= 0
            && self.keep_labels.is_empty()
    }

    pub fn keep_last(mut self, n: u32) -> Self {
        self.keep_last = Some(n);
        self
    }

    pub fn keep_hourly(mut self, n: u32) -> Self {
        self.keep_hourly = Some(n);
        self
    }

    pub fn keep_daily(mut self, n: u32) -> Self {
        self.keep_daily = Some(n);
        self
    }

    pub fn keep_weekly(mut self, n: u32) -> Self {
        self.keep_weekly = Some(n);
        self
    }

    pub fn keep_monthly(mut self, n: u32) -> Self {
        self.keep_monthly = Some(n);
        self
    }

    pub fn keep_yearly(mut self, n: u32) -> Self {
        self.keep_yearly = Some(n);
        self
    }

    /// Milliseconds; see [`parse_duration`].
    pub fn keep_within(mut self, ms: i64) -> Self {
        self.keep_within_ms = Some(ms);
        self
    }

    /// Adds a label to keep.
    pub fn keep_label(mut self, label: impl Into<String>) -> Self {
        self.keep_labels.push(label.into());
        self
    }
}

/// One snapshot of one agent, as the rules see it.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub id: String,
    pub created_at_ms: i64,
    pub label: Option<String>,
    pub pinned: bool,
}

/// The decision for one snapshot, with every reason it is kept (empty when it goes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub created_at_ms: i64,
    pub keep: bool,
    pub reasons: Vec<String>,
}

/// Decides for one agent's snapshots (any input order); the result is newest first.
pub(crate) fn decide(policy: &RetentionPolicy, snapshots: &[Candidate]) -> Vec<Decision> {
    let mut order: Vec<&Candidate> = snapshots.iter().collect();
    order.sort_by(|a, b| (b.created_at_ms, &b.id).cmp(&(a.created_at_ms, &a.id)));
    let Some(newest) = order.first() else {
        return Vec::new();
    };
    let last = policy
        .keep_last
        .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let within_from = policy
        .keep_within_ms
        .filter(|d| *d > 0)
        .map(|d| newest.created_at_ms.saturating_sub(d));
    let mut periodic = [
        Periodic::new("hourly", policy.keep_hourly, |t| {
            format!("{:04}-{:02}-{:02} {:02}h", t.year, t.month, t.day, t.hour)
        }),
        Periodic::new("daily", policy.keep_daily, |t| {
            format!("{:04}-{:02}-{:02}", t.year, t.month, t.day)
        }),
        Periodic::new("weekly", policy.keep_weekly, |t| {
            let (year, week) = iso_week(t.days);
            format!("{year:04}-W{week:02}")
        }),
        Periodic::new("monthly", policy.keep_monthly, |t| {
            format!("{:04}-{:02}", t.year, t.month)
        }),
        Periodic::new("yearly", policy.keep_yearly, |t| format!("{:04}", t.year)),
    ];
    order
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut reasons = Vec::new();
            if c.pinned {
                reasons.push("pinned".to_owned());
            }
            if i == 0 {
                reasons.push("newest".to_owned());
            }
            if i < last {
                reasons.push("last".to_owned());
            }
            let t = Utc::of(c.created_at_ms);
            reasons.extend(periodic.iter_mut().filter_map(|p| p.keeps(&t)));
            if within_from.is_some_and(|from| c.created_at_ms >= from) {
                reasons.push("within".to_owned());
            }
            if let Some(label) = &c.label
                && policy.keep_labels.contains(label)
            {
                reasons.push(format!("label {label}"));
            }
            Decision {
                id: c.id.clone(),
                created_at_ms: c.created_at_ms,
                keep: !reasons.is_empty(),
                reasons,
            }
        })
        .collect()
}

/// One of the hourly ... yearly rules, walked newest to oldest.
struct Periodic {
    rule: &'static str,
    /// Periods this rule may still keep a snapshot for.
    left: u32,
    /// The period of the last snapshot this rule kept.
    last: Option<String>,
    period: fn(&Utc) -> String,
}

impl Periodic {
    fn new(rule: &'static str, count: Option<u32>, period: fn(&Utc) -> String) -> Self {
        Self {
            rule,
            left: count.unwrap_or(0),
            last: None,
            period,
        }
    }

    /// The reason to keep this snapshot, if it is the first (newest) seen in a new period. Periods
    /// only move back in time as the walk does, so "new" is "not the last one kept".
    fn keeps(&mut self, t: &Utc) -> Option<String> {
        if self.left == 0 {
            return None;
        }
        let period = (self.period)(t);
        if self.last.as_ref() == Some(&period) {
            return None;
        }
        self.left -= 1;
        let reason = format!("{} {period}", self.rule);
        self.last = Some(period);
        Some(reason)
    }
}

/// A UTC time, broken into the fields the periods need.
struct Utc {
    /// Days since 1970-01-01.
    days: i64,
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
}

impl Utc {
    fn of(ms: i64) -> Self {
        let days = ms.div_euclid(MS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        Self {
            days,
            year,
            month,
            day,
            hour: ms.rem_euclid(MS_PER_DAY) / MS_PER_HOUR,
        }
    }
}

/// The ISO 8601 (week-year, week) of a day counted from 1970-01-01. A week runs Monday to Sunday
/// and belongs to the year that holds its Thursday; week 1 is the one with the year's first
/// Thursday.
fn iso_week(days: i64) -> (i64, i64) {
    // 1970-01-01 was a Thursday: weekday 3, counting Monday as 0.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (year, _, _) = civil_from_days(thursday);
    (year, (thursday - days_from_civil(year, 1, 1)) / 7 + 1)
}

/// Parses a restic-style duration: a sequence of <number><unit> with units y (365 days), m (30
/// days, a month), w, d, h, e.g. "1y6m", "2w3d", "36h". Errors name the bad part.
///
/// Unlike restic, whose months and years are calendar ones, every unit is a fixed length.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    const UNITS: &str = "use y, m, w, d or h, as in 1y6m, 2w3d or 36h";
    if s.is_empty() {
        return Err(format!("empty duration ({UNITS})"));
    }
    let mut total: i64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        if number.is_empty() {
            return Err(format!(
                "duration {s:?}: expected a number at {rest:?} ({UNITS})"
            ));
        }
        let Some(unit) = after.chars().next() else {
            return Err(format!("duration {s:?}: {number:?} has no unit ({UNITS})"));
        };
        let part = &rest[..digits + unit.len_utf8()];
        let unit_ms = match unit {
            'y' => 365 * MS_PER_DAY,
            'm' => 30 * MS_PER_DAY,
            'w' => 7 * MS_PER_DAY,
            'd' => MS_PER_DAY,
            'h' => MS_PER_HOUR,
            _ => {
                return Err(format!(
                    "duration {s:?}: unknown unit {unit:?} in {part:?} ({UNITS})"
                ));
            }
        };
        total = number
            .parse::<i64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_ms))
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| format!("duration {s:?}: {part:?} is too long"))?;
        rest = &rest[part.len()..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Milliseconds of "YYYY-MM-DD HH:MM" or "YYYY-MM-DD HH:MM:SS.mmm", UTC.
    fn at(spec: &str) -> i64 {
        let n = |range: std::ops::Range<usize>| -> i64 {
            spec.get(range)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad time {spec}"))
        };
        let mut ms = days_from_civil(n(0..4), n(5..7), n(8..10)) * MS_PER_DAY
            + n(11..13) * MS_PER_HOUR
            + n(14..16) * 60_000;
        if spec.len() > 16 {
            ms += n(17..19) * 1000 + n(20..23);
        }
        ms
    }

    fn snap(spec: &str) -> Candidate {
        Candidate {
            id: spec.to_owned(),
            created_at_ms: at(spec),
            label: None,
            pinned: false,
        }
    }

    fn day_id(days: i64, time: &str) -> String {
        let (y, m, d) = civil_from_days(days);
        format!("{y:04}-{m:02}-{d:02} {time}")
    }

    /// One agent's history, ids being the UTC times they were taken at:
    /// - every 6 hours over the last three days, 2026-12-31 to the newest, 2027-01-02 18:00, with
    ///   a second snapshot in the 12h hour of 2027-01-02 and one at midnight on New Year's Day;
    /// - daily at 09:00 from 2026-11-01 to 2026-12-30, except 2026-12-23 at 18:00 (exactly 10
    ///   days before the newest), the last millisecond of Sunday 2026-12-27 (2026-W52) and
    ///   midnight on Monday 2026-12-28 (2026-W53); 2026-12-15 is labeled `pre-upgrade`;
    /// - Wednesdays at 15:00 from 2026-10-28 back to 2025-01-01, none in September 2026; among
    ///   them 2025-12-31 (ISO 2026-W01), 2026-06-17 labeled `release`, 2025-05-14 pinned and
    ///   labeled `release`, 2025-03-05 labeled `scratch`;
    /// - 2024-12-30 (ISO 2025-W01) and 2024-12-29 (2024-W52), the oldest.
    ///
    /// Returned in a scrambled order: `decide` sorts.
    fn history() -> Vec<Candidate> {
        let mut ids: Vec<String> = Vec::new();
        for day in ["2026-12-31", "2027-01-01", "2027-01-02"] {
            for time in ["00:00", "06:00", "12:00", "18:00"] {
                ids.push(format!("{day} {time}"));
            }
        }
        ids.push("2027-01-02 12:40".into());
        for days in days_from_civil(2026, 11, 1)..=days_from_civil(2026, 12, 30) {
            let id = match civil_from_days(days) {
                (2026, 12, 23) => "2026-12-23 18:00".into(),
                (2026, 12, 27) => "2026-12-27 23:59:59.999".into(),
                (2026, 12, 28) => "2026-12-28 00:00".into(),
                _ => day_id(days, "09:00"),
            };
            ids.push(id);
        }
        let mut wednesday = days_from_civil(2026, 10, 28);
        while wednesday >= days_from_civil(2025, 1, 1) {
            if !matches!(civil_from_days(wednesday), (2026, 9, _)) {
                ids.push(day_id(wednesday, "15:00"));
            }
            wednesday -= 7;
        }
        ids.push("2024-12-30 10:00".into());
        ids.push("2024-12-29 10:00".into());

        let mut snaps: Vec<Candidate> = ids.iter().map(|id| snap(id)).collect();
        for c in &mut snaps {
            match c.id.as_str() {
                "2026-12-15 09:00" => c.label = Some("pre-upgrade".into()),
                "2026-06-17 15:00" => c.label = Some("release".into()),
                "2025-05-14 15:00" => {
                    c.label = Some("release".into());
                    c.pinned = true;
                }
                "2025-03-05 15:00" => c.label = Some("scratch".into()),
                _ => {}
            }
        }
        assert_eq!(snaps.len(), 13 + 60 + 96 - 5 + 2, "history size");
        snaps.reverse();
        snaps.rotate_left(41);
        snaps
    }

    /// The kept snapshots, newest first, as (id, reasons joined by ", ").
    fn kept(policy: &RetentionPolicy) -> Vec<(String, String)> {
        decide(policy, &history())
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| (d.id, d.reasons.join(", ")))
            .collect()
    }

    fn golden(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(id, reasons)| ((*id).to_owned(), (*reasons).to_owned()))
            .collect()
    }

    const PINNED: (&str, &str) = ("2025-05-14 15:00", "pinned");

    #[test]
    fn keep_last_keeps_the_newest_n() {
        assert_eq!(
            kept(&RetentionPolicy::default().keep_last(3)),
            golden(&[
                ("2027-01-02 18:00", "newest, last"),
                ("2027-01-02 12:40", "last"),
                ("2027-01-02 12:00", "last"),
                PINNED,
            ])
        );
    }

    #[test]
    fn keep_hourly_keeps_the_newest_of_each_hour() {
        // 12:40 and 12:00 share an hour: the newer one stands for it.
        assert_eq!(
            kept(&RetentionPolicy::default().keep_hourly(4)),
            golden(&[
                ("2027-01-02 18:00", "newest, hourly 2027-01-02 18h"),
                ("2027-01-02 12:40", "hourly 2027-01-02 12h"),
                ("2027-01-02 06:00", "hourly 2027-01-02 06h"),
                ("2027-01-02 00:00", "hourly 2027-01-02 00h"),
                PINNED,
            ])
        );
    }

    #[test]
    fn keep_daily_splits_days_at_utc_midnight() {
        assert_eq!(
            kept(&RetentionPolicy::default().keep_daily(7)),
            golden(&[
                ("2027-01-02 18:00", "newest, daily 2027-01-02"),
                ("2027-01-01 18:00", "daily 2027-01-01"),
                ("2026-12-31 18:00", "daily 2026-12-31"),
                ("2026-12-30 09:00", "daily 2026-12-30"),
                ("2026-12-29 09:00", "daily 2026-12-29"),
                ("2026-12-28 00:00", "daily 2026-12-28"),
                ("2026-12-27 23:59:59.999", "daily 2026-12-27"),
                PINNED,
            ])
        );
    }

    #[test]
    fn keep_weekly_uses_iso_weeks_starting_monday() {
        // 2027-01-02 is in 2026-W53, which began at midnight on Monday 2026-12-28; the
        // millisecond before belongs to 2026-W52.
        assert_eq!(
            kept(&RetentionPolicy::default().keep_weekly(5)),
            golden(&[
                ("2027-01-02 18:00", "newest, weekly 2026-W53"),
                ("2026-12-27 23:59:59.999", "weekly 2026-W52"),
                ("2026-12-20 09:00", "weekly 2026-W51"),
                ("2026-12-13 09:00", "weekly 2026-W50"),
                ("2026-12-06 09:00", "weekly 2026-W49"),
                PINNED,
            ])
        );
    }

    #[test]
    fn keep_monthly_counts_only_months_with_a_snapshot() {
        // No snapshot in September 2026: the sixth month kept is July.
        assert_eq!(
            kept(&RetentionPolicy::default().keep_monthly(6)),
            golden(&[
                ("2027-01-02 18:00", "newest, monthly 2027-01"),
                ("2026-12-31 18:00", "monthly 2026-12"),
                ("2026-11-30 09:00", "monthly 2026-11"),
                ("2026-10-28 15:00", "monthly 2026-10"),
                ("2026-08-26 15:00", "monthly 2026-08"),
                ("2026-07-29 15:00", "monthly 2026-07"),
                PINNED,
            ])
        );
    }

    #[test]
    fn keep_yearly_uses_calendar_years() {
        // 2025-12-31 is in ISO week 2026-W01 but in calendar year 2025.
        assert_eq!(
            kept(&RetentionPolicy::default().keep_yearly(3)),
            golden(&[
                ("2027-01-02 18:00", "newest, yearly 2027"),
                ("2026-12-31 18:00", "yearly 2026"),
                ("2025-12-31 15:00", "yearly 2025"),
                PINNED,
            ])
        );
    }

    #[test]
    fn keep_within_counts_back_from_the_newest_snapshot_inclusive() {
        let ten_days = parse_duration("10d").expect("duration");
        assert_eq!(
            kept(&RetentionPolicy::default().keep_within(ten_days)),
            golden(&[
                ("2027-01-02 18:00", "newest, within"),
                ("2027-01-02 12:40", "within"),
                ("2027-01-02 12:00", "within"),
                ("2027-01-02 06:00", "within"),
                ("2027-01-02 00:00", "within"),
                ("2027-01-01 18:00", "within"),
                ("2027-01-01 12:00", "within"),
                ("2027-01-01 06:00", "within"),
                ("2027-01-01 00:00", "within"),
                ("2026-12-31 18:00", "within"),
                ("2026-12-31 12:00", "within"),
                ("2026-12-31 06:00", "within"),
                ("2026-12-31 00:00", "within"),
                ("2026-12-30 09:00", "within"),
                ("2026-12-29 09:00", "within"),
                ("2026-12-28 00:00", "within"),
                ("2026-12-27 23:59:59.999", "within"),
                ("2026-12-26 09:00", "within"),
                ("2026-12-25 09:00", "within"),
                ("2026-12-24 09:00", "within"),
                ("2026-12-23 18:00", "within"),
                PINNED,
            ])
        );
    }

    #[test]
    fn keep_label_keeps_exactly_the_listed_labels() {
        assert_eq!(
            kept(&RetentionPolicy::default().keep_label("release")),
            golden(&[
                ("2027-01-02 18:00", "newest"),
                ("2026-06-17 15:00", "label release"),
                ("2025-05-14 15:00", "pinned, label release"),
            ])
        );
    }

    #[test]
    fn combined_rules_keep_the_union_and_list_every_reason_in_order() {
        let policy = RetentionPolicy::default()
            .keep_last(2)
            .keep_hourly(2)
            .keep_daily(4)
            .keep_weekly(3)
            .keep_monthly(3)
            .keep_yearly(5)
            .keep_within(parse_duration("1d").expect("duration"))
            .keep_label("release")
            .keep_label("pre-upgrade");
        // Yearly 5 finds only four years with a snapshot. 2024-12-30 is 2025-W01 by ISO week
        // but stands for the calendar year 2024.
        assert_eq!(
            kept(&policy),
            golden(&[
                (
                    "2027-01-02 18:00",
                    "newest, last, hourly 2027-01-02 18h, daily 2027-01-02, weekly 2026-W53, \
                     monthly 2027-01, yearly 2027, within"
                ),
                ("2027-01-02 12:40", "last, hourly 2027-01-02 12h, within"),
                ("2027-01-02 12:00", "within"),
                ("2027-01-02 06:00", "within"),
                ("2027-01-02 00:00", "within"),
                ("2027-01-01 18:00", "daily 2027-01-01, within"),
                (
                    "2026-12-31 18:00",
                    "daily 2026-12-31, monthly 2026-12, yearly 2026"
                ),
                ("2026-12-30 09:00", "daily 2026-12-30"),
                ("2026-12-27 23:59:59.999", "weekly 2026-W52"),
                ("2026-12-20 09:00", "weekly 2026-W51"),
                ("2026-12-15 09:00", "label pre-upgrade"),
                ("2026-11-30 09:00", "monthly 2026-11"),
                ("2026-06-17 15:00", "label release"),
                ("2025-12-31 15:00", "yearly 2025"),
                ("2025-05-14 15:00", "pinned, label release"),
                ("2024-12-30 10:00", "yearly 2024"),
            ])
        );

        // Every snapshot gets a decision, newest first; those that go have no reason.
        let all = decide(&policy, &history());
        assert_eq!(all.len(), history().len());
        assert!(
            all.windows(2)
                .all(|w| (w[0].created_at_ms, &w[0].id) > (w[1].created_at_ms, &w[1].id))
        );
        assert!(all.iter().all(|d| d.keep != d.reasons.is_empty()));
        assert_eq!(all.last().map(|d| d.id.as_str()), Some("2024-12-29 10:00"));
    }

    #[test]
    fn weeks_and_years_at_year_ends() {
        let snaps: Vec<Candidate> = [
            "2020-12-31 12:00",
            "2021-01-03 12:00",
            "2024-12-29 23:59:59.999",
            "2024-12-30 00:00",
            "2025-12-28 12:00",
            "2025-12-31 23:59:59.999",
            "2026-01-01 00:00",
            "2026-12-31 12:00",
            "2027-01-03 23:59:59.999",
            "2027-01-04 00:00",
        ]
        .iter()
        .map(|id| snap(id))
        .collect();
        let policy = RetentionPolicy::default().keep_weekly(100).keep_yearly(100);
        let got: Vec<(String, String)> = decide(&policy, &snaps)
            .into_iter()
            .map(|d| (d.id, d.reasons.join(", ")))
            .collect();
        assert_eq!(
            got,
            golden(&[
                ("2027-01-04 00:00", "newest, weekly 2027-W01, yearly 2027"),
                ("2027-01-03 23:59:59.999", "weekly 2026-W53"),
                ("2026-12-31 12:00", "yearly 2026"),
                ("2026-01-01 00:00", "weekly 2026-W01"),
                ("2025-12-31 23:59:59.999", "yearly 2025"),
                ("2025-12-28 12:00", "weekly 2025-W52"),
                ("2024-12-30 00:00", "weekly 2025-W01, yearly 2024"),
                ("2024-12-29 23:59:59.999", "weekly 2024-W52"),
                ("2021-01-03 12:00", "weekly 2020-W53, yearly 2021"),
                ("2020-12-31 12:00", "yearly 2020"),
            ])
        );
    }

    #[test]
    fn newest_and_pinned_survive_a_policy_that_keeps_nothing_else() {
        assert_eq!(
            kept(&RetentionPolicy::default().keep_label("no-such-label")),
            golden(&[("2027-01-02 18:00", "newest"), PINNED])
        );
        // A lone snapshot is the newest.
        let one = decide(
            &RetentionPolicy::default().keep_last(0),
            &[snap("2026-01-01 00:00")],
        );
        assert_eq!(
            one,
            vec![Decision {
                id: "2026-01-01 00:00".into(),
                created_at_ms: at("2026-01-01 00:00"),
                keep: true,
                reasons: vec!["newest".into()],
            }]
        );
    }

    #[test]
    fn no_snapshots_no_decisions() {
        assert!(decide(&RetentionPolicy::default().keep_last(3), &[]).is_empty());
    }

    #[test]
    fn equal_times_order_by_id_as_latest_does() {
        let mut a = snap("2026-05-01 10:00");
        a.id = "aaaaaaaa".into();
        let mut b = a.clone();
        b.id = "bbbbbbbb".into();
        let got = decide(&RetentionPolicy::default().keep_daily(1), &[a, b]);
        let got: Vec<(&str, &[String])> = got
            .iter()
            .map(|d| (d.id.as_str(), d.reasons.as_slice()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "bbbbbbbb",
                    &["newest".to_owned(), "daily 2026-05-01".to_owned()][..]
                ),
                ("aaaaaaaa", &[][..]),
            ]
        );
    }

    #[test]
    fn empty_policies() {
        assert!(RetentionPolicy::default().is_empty());
        assert!(
            RetentionPolicy::default()
                .keep_last(0)
                .keep_weekly(0)
                .keep_within(0)
                .is_empty()
        );
        for policy in [
            RetentionPolicy::default().keep_last(1),
            RetentionPolicy::default().keep_hourly(1),
            RetentionPolicy::default().keep_daily(1),
            RetentionPolicy::default().keep_weekly(1),
            RetentionPolicy::default().keep_monthly(1),
            RetentionPolicy::default().keep_yearly(1),
            RetentionPolicy::default().keep_within(1),
            RetentionPolicy::default().keep_label("x"),
        ] {
            assert!(!policy.is_empty(), "{policy:?}");
        }
    }

    #[test]
    fn policies_read_from_json_with_defaults_and_no_unknown_fields() {
        let p: RetentionPolicy =
            serde_json::from_str(r#"{"keep_daily": 7, "keep_labels": ["release"]}"#).expect("json");
        assert_eq!(
            p,
            RetentionPolicy::default()
                .keep_daily(7)
                .keep_label("release")
        );
        assert!(serde_json::from_str::<RetentionPolicy>(r#"{"keep_dayly": 7}"#).is_err());
    }

    #[test]
    fn durations_parse() {
        let (h, d) = (MS_PER_HOUR, MS_PER_DAY);
        for (s, ms) in [
            ("36h", 36 * h),
            ("10d", 10 * d),
            ("2w3d", 17 * d),
            ("1y6m", 365 * d + 180 * d),
            ("1y2m3w4d5h", (365 + 60 + 21 + 4) * d + 5 * h),
            ("1d1d", 2 * d),
            ("0d", 0),
            ("007h", 7 * h),
        ] {
            assert_eq!(parse_duration(s), Ok(ms), "{s}");
        }
    }

    #[test]
    fn bad_durations_name_the_bad_part() {
        for (s, part) in [
            ("", "empty"),
            ("10", r#""10" has no unit"#),
            ("1y6", r#""6" has no unit"#),
            ("d", r#"a number at "d""#),
            ("-1d", r#"a number at "-1d""#),
            ("1.5d", r#"unknown unit '.' in "1.""#),
            (" 1d", r#"a number at " 1d""#),
            ("1x", r#"unknown unit 'x' in "1x""#),
            ("2w3D", r#"unknown unit 'D' in "3D""#),
            ("1dé", r#"a number at "é""#),
            ("3é", r#"unknown unit 'é' in "3é""#),
            (
                "99999999999999999999y",
                r#""99999999999999999999y" is too long"#,
            ),
            ("1d9999999999999y", r#""9999999999999y" is too long"#),
        ] {
            let e = parse_duration(s).expect_err(s);
            assert!(e.contains(part), "{s:?}: {e}");
        }
    }

    #[test]
    fn iso_weeks_of_known_dates() {
        for ((y, m, d), week) in [
            ((2024, 12, 29), (2024, 52)),
            ((2024, 12, 30), (2025, 1)),
            ((2021, 1, 3), (2020, 53)),
            ((2021, 1, 4), (2021, 1)),
            ((2020, 12, 31), (2020, 53)),
            ((2025, 12, 31), (2026, 1)),
            ((2026, 11, 27), (2026, 48)),
            ((2027, 1, 1), (2026, 53)),
            ((2027, 1, 4), (2027, 1)),
            ((1970, 1, 1), (1970, 1)),
            ((1969, 12, 29), (1970, 1)),
            ((1969, 12, 28), (1969, 52)),
        ] {
            assert_eq!(iso_week(days_from_civil(y, m, d)), week, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn civil_dates_match_known_unix_times() {
        // Unix seconds from `date -u -d <date> +%s`.
        for ((y, m, d), secs) in [
            ((1970, 1, 1), 0),
            ((2024, 12, 30), 1_735_516_800),
            ((2025, 12, 31), 1_767_139_200),
            ((2026, 11, 27), 1_795_737_600),
            ((2027, 1, 2), 1_798_848_000),
            ((1969, 12, 31), -86_400),
        ] {
            let days = days_from_civil(y, m, d);
            assert_eq!(days * 86_400, secs, "{y}-{m}-{d}");
            assert_eq!(civil_from_days(days), (y, m, d));
        }
        for days in -800_000..800_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        let t = Utc::of(at("2026-12-27 23:59:59.999"));
        assert_eq!((t.year, t.month, t.day, t.hour), (2026, 12, 27, 23));
        let t = Utc::of(-1);
        assert_eq!((t.year, t.month, t.day, t.hour), (1969, 12, 31, 23));
    }
}
