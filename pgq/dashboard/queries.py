"""The statements only the dashboard runs, each with its purpose and the index it relies on.

Every page must stay fast on a jobs table of millions of finished rows, so no statement here counts the
whole table: waiting and running jobs are read through their partial indexes, finished ones through
jobs_finished_idx over a bounded time range, and totals per state are the planner's estimates. Timings
are from a table of 1,000,000 finished and 2,000 waiting jobs (docs/dashboard.md, "Performance").
"""

from __future__ import annotations

# Waiting and running jobs per queue, exactly. Written as three branches so that each matches the
# predicate of a partial index (jobs_claim_idx, jobs_limited_claim_idx, jobs_lease_idx): a plain
# `status IN ('queued', 'retrying')` matches neither claim index alone, and the planner scanned all of
# pgq.jobs instead (105 ms at 1M finished jobs; 1.3 ms this way).
QUEUE_DEPTHS = """
SELECT queue,
       count(*) FILTER (WHERE status = 'queued' AND run_at <= now()) AS ready,
       count(*) FILTER (WHERE status = 'queued' AND run_at > now()) AS scheduled,
       count(*) FILTER (WHERE status = 'retrying') AS retrying,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'running' AND lease_expires_at < now()) AS stuck,
       max(now() - run_at) FILTER (WHERE status <> 'running' AND run_at <= now()) AS oldest_due
FROM (SELECT queue, status, run_at, NULL::timestamptz AS lease_expires_at FROM pgq.jobs
      WHERE status IN ('queued', 'retrying') AND NOT limited
      UNION ALL
      SELECT queue, status, run_at, NULL FROM pgq.jobs WHERE status IN ('queued', 'retrying') AND limited
      UNION ALL
      SELECT queue, status, run_at, lease_expires_at FROM pgq.jobs WHERE status = 'running') AS unfinished
GROUP BY queue
"""

# Jobs that finished since `since` (the start of a minute, read from the database's clock), per minute,
# queue and state: the throughput chart and the "last hour" columns. A range scan of jobs_finished_idx, so
# its cost grows with the jobs finished in the range, not with the table: 2.8 ms for the 6,000 jobs of an
# hour, but 900 ms when 1,000,000 finished within the hour. The dashboard therefore keeps the counts of
# past minutes (pgq.dashboard.data.Throughput) and reads only the last two minutes on each refresh.
FINISHED_SINCE = """
SELECT date_trunc('minute', finished_at) AS minute, queue, status, count(*) AS jobs
FROM pgq.jobs
WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at >= %(since)s::timestamptz
GROUP BY 1, 2, 3
"""

# The database's clock, and the planner's estimate of the rows of pgq.jobs per state (reltuples times the
# most common values' frequencies that ANALYZE keeps in pg_stats). Counting 1M rows took 260 ms; this
# reads two catalog rows. NULL frequencies: the table was never analyzed.
STATE_ESTIMATES = """
SELECT now(), date_trunc('minute', now()),
       (SELECT greatest(c.reltuples, 0)::bigint FROM pg_class AS c WHERE c.oid = 'pgq.jobs'::regclass),
       (SELECT most_common_vals::text::text[] FROM pg_stats
        WHERE schemaname = 'pgq' AND tablename = 'jobs' AND attname = 'status'),
       (SELECT most_common_freqs FROM pg_stats
        WHERE schemaname = 'pgq' AND tablename = 'jobs' AND attname = 'status')
"""

# The latest jobs that failed for good in the last day: a backward walk of jobs_finished_idx (0.2 ms).
LATEST_FAILURES = """
SELECT id, queue, task_name, attempts, finished_at, last_error, now() - finished_at AS ago
FROM pgq.jobs
WHERE status IN ('succeeded', 'failed', 'cancelled') AND status = 'failed'
  AND finished_at > now() - interval '24 hours'
ORDER BY finished_at DESC
LIMIT %(limit)s
"""

# Workers heard from in the last 30 seconds, and all worker rows.
WORKER_COUNTS = """
SELECT count(*) FILTER (WHERE last_heartbeat_at > now() - interval '30 seconds'), count(*) FROM pgq.workers
"""

# The job list: newest first, a page after the id `before` (keyset paging: page 1,000 costs what page 1
# does, where OFFSET would walk every row before it). A backward walk of the primary key with the filters
# checked on the way, so a filter that matches many recent jobs is fast (2-3 ms) and one that matches
# nothing reads the table (250 ms; a text search, 500 ms at 1M rows; statement_timeout bounds it).
# `search`: a job id, or text found in the task name, arguments or last error.
JOBS_PAGE = """
SELECT id, queue, task_name, status, attempts, max_attempts, priority, created_at, run_at, started_at,
       finished_at, last_error, now() - created_at AS age,
       coalesce(finished_at, CASE WHEN status = 'running' THEN now() END) - started_at AS ran_for
FROM pgq.jobs
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(task)s::text IS NULL OR task_name = %(task)s::text)
  AND (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
  AND (%(before)s::bigint IS NULL OR id < %(before)s::bigint)
  AND (%(search_id)s::bigint IS NULL OR id = %(search_id)s::bigint)
  AND (%(pattern)s::text IS NULL OR task_name ILIKE %(pattern)s::text OR args::text ILIKE %(pattern)s::text
       OR kwargs::text ILIKE %(pattern)s::text OR last_error ILIKE %(pattern)s::text)
ORDER BY id DESC
LIMIT %(limit)s
"""

# Delete finished jobs and their stored outcomes (pgq.results has no foreign key to pgq.jobs, so both
# are deleted here, in one statement). A job that is waiting or running is left alone, and so is one that
# a retry by hand or a pruner holds locked: SKIP LOCKED, never a wait behind a worker. Returns the ids
# deleted.
DELETE_FINISHED = """
WITH doomed AS (
    SELECT id FROM pgq.jobs
    WHERE id = ANY(%(ids)s::bigint[]) AND status IN ('succeeded', 'failed', 'cancelled')
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM pgq.jobs AS j USING doomed
    WHERE j.id = doomed.id AND j.status IN ('succeeded', 'failed', 'cancelled')
    RETURNING j.id
), results AS (
    DELETE FROM pgq.results WHERE job_id = ANY(ARRAY(SELECT id FROM deleted))
)
SELECT id FROM deleted
"""
