"""Every statement pgq runs at runtime, each with its purpose.

Values are always bound parameters (``%(name)s``; psycopg 3 and psycopg2 both speak this style, which
is what lets SQLAlchemy users enqueue through whatever driver their engine uses). The schema name is a
constant of pgq, not configuration, so it is written into the text. All time arithmetic uses the
database clock: Python sends durations, never timestamps to compare against.
"""

from __future__ import annotations

SCHEMA = "pgq"  # written into every statement below; pgq.schema declares the same name

# Whether a job goes through the limited claim (see pgq.limits): it carries a concurrency key, or its
# queue or its task has a row in pgq.limits (one primary-key probe, 3 µs). Shared by the enqueues of one job.
LIMITED = """({key} IS NOT NULL OR EXISTS (SELECT 1 FROM pgq.limits AS lim
                                         WHERE lim.key IN ('queue:' || {queue}, 'task:' || {task})))"""

# Enqueue one job. `eta` (an absolute, timezone-aware instant the user chose) wins over `countdown`
# (seconds from the database's now). The NOTIFY is sent by the jobs_notify trigger at commit.
#
# Where a one-job transaction spends the server's CPU (perf record --call-graph dwarf of the backend
# while pgbench -M prepared ran this statement, 2,300-2,600 tps, PostgreSQL 18): the commit's WAL flush
# 32 %, socket I/O 14 %, pgq.jobs's 7 CHECK constraints 12 % (PostgreSQL parses their stored
# expressions again for every statement: stringToNode alone 7.7 %), executor start-up 8 % (opening the
# 9 indexes, this statement's limits look-up), the NOTIFY trigger 7.6 %, index inserts 5.4 %. The plan
# is cached (generic after 5 executions); none of it is planning. benchmarks/enqueue_anatomy.py
# measures the same layers by taking them away one at a time.
ENQUEUE = """
INSERT INTO pgq.jobs (queue, task_name, args, kwargs, priority, max_attempts, retry_backoff,
                      lease_seconds, ignore_result, run_at, concurrency_key, key_concurrency, limited)
VALUES (%(queue)s, %(task_name)s, %(args)s::jsonb, %(kwargs)s::jsonb, %(priority)s, %(max_attempts)s,
        %(retry_backoff)s, %(lease_seconds)s, %(ignore_result)s,
        COALESCE(%(eta)s::timestamptz, now() + make_interval(secs => COALESCE(%(countdown)s::float8, 0))),
        %(concurrency_key)s, %(key_concurrency)s,
        """ + LIMITED.format(key="%(concurrency_key)s::text", queue="%(queue)s::text",
                             task="%(task_name)s::text") + """)
RETURNING id
"""

# Enqueue many jobs in one statement: one array per column, unnested in order, so the ids come back in
# the order of the input (identity values are taken row by row). One NOTIFY per queue, by the trigger.
# `limited` as in LIMITED, but against the declared queue and task limits read once per statement (a
# probe per job cost 15-20 % of the bulk rate; this, about 3 %).
ENQUEUE_MANY = """
INSERT INTO pgq.jobs (queue, task_name, args, kwargs, priority, max_attempts, retry_backoff,
                      lease_seconds, ignore_result, run_at, concurrency_key, key_concurrency, limited)
SELECT b.queue, b.task_name, e.job -> 1, e.job -> 2, b.priority, b.max_attempts, b.retry_backoff,
       b.lease_seconds, b.ignore_result, COALESCE(b.eta, now() + make_interval(secs => COALESCE(b.countdown, 0))),
       k.concurrency_key, COALESCE((e.job ->> 4)::int, b.key_concurrency),
       k.concurrency_key IS NOT NULL OR 'queue:' || b.queue = ANY(lim.keys) OR 'task:' || b.task_name = ANY(lim.keys)
FROM jsonb_array_elements(%(jobs)s::jsonb) WITH ORDINALITY AS e(job, n)
JOIN jsonb_to_recordset(%(bases)s::jsonb)
     AS b(i int, queue text, task_name text, priority smallint, max_attempts int, retry_backoff float8,
          lease_seconds int, ignore_result bool, eta timestamptz, countdown float8, concurrency_key text,
          key_concurrency int)
  ON b.i = (e.job ->> 0)::int
CROSS JOIN LATERAL (SELECT COALESCE(e.job ->> 3, b.concurrency_key) AS concurrency_key) AS k
CROSS JOIN (SELECT ARRAY(SELECT key FROM pgq.limits WHERE NOT starts_with(key, 'key:')) AS keys) AS lim
ORDER BY e.n
RETURNING id
"""

# Enqueue with unique_for: one producer at a time per key, until its transaction ends (see enqueue.write).
# A separate statement, so that the ENQUEUE_UNIQUE after it takes its snapshot once the lock is held.
UNIQUE_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('pgq.unique:' || %(unique_key)s, 0))"

# Enqueue a job with a unique key, or return the job that holds the key: (id, true) when inserted,
# (id, false) for the existing job. A key is held by its waiting or running job (jobs_unique_key_idx,
# which also arbitrates concurrent inserts) and, for `unique_for` seconds, by a job that finished
# (succeeded or failed; a cancelled job lets go of its key). No row: a concurrent producer's job
# committed after this statement's snapshot was taken; run it again (enqueue.write does).
ENQUEUE_UNIQUE = """
WITH existing AS (
    SELECT coalesce(
        (SELECT id FROM pgq.jobs
         WHERE unique_key = %(unique_key)s AND status IN ('queued', 'retrying', 'running') LIMIT 1),
        (SELECT id FROM pgq.jobs
         WHERE unique_key = %(unique_key)s AND status IN ('succeeded', 'failed')
           AND finished_at >= now() - make_interval(secs => %(unique_for)s::float8)
         ORDER BY finished_at DESC LIMIT 1)
    ) AS id
), inserted AS (
    INSERT INTO pgq.jobs (queue, task_name, args, kwargs, priority, max_attempts, retry_backoff,
                          lease_seconds, ignore_result, run_at, unique_key, concurrency_key, key_concurrency,
                          limited)
    SELECT %(queue)s, %(task_name)s, %(args)s::jsonb, %(kwargs)s::jsonb, %(priority)s, %(max_attempts)s,
           %(retry_backoff)s, %(lease_seconds)s, %(ignore_result)s,
           COALESCE(%(eta)s::timestamptz, now() + make_interval(secs => COALESCE(%(countdown)s::float8, 0))),
           %(unique_key)s, %(concurrency_key)s, %(key_concurrency)s::int,
           """ + LIMITED.format(key="%(concurrency_key)s::text", queue="%(queue)s::text",
                                task="%(task_name)s::text") + """
    WHERE (SELECT id FROM existing) IS NULL
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND status IN ('queued', 'retrying', 'running')
    DO NOTHING
    RETURNING id
)
SELECT id, true FROM inserted
UNION ALL
SELECT id, false FROM existing WHERE id IS NOT NULL
"""

# Claim up to `limit` due jobs of the given queues. The CTE is the optimization fence that makes LIMIT
# mean what it says: as an `IN (subquery)` the locking subquery may be re-run and claim more rows.
# SKIP LOCKED lets concurrent workers pass each other instead of queueing on the same rows. Each claim
# increments `attempts` (for people: "attempt 2 of 3") and draws a new `claim_token` (CLAIM_TOKEN), the
# fencing token of everything this attempt writes later.
#
# One LATERAL subquery per queue: with `queue = ANY(…)` the planner could not walk jobs_claim_idx in
# order and sorted the whole backlog on every claim (4.4-5.5 ms per claim at 20,000 waiting jobs;
# 0.1 ms this way, whatever the backlog). Each queue locks at most `limit` rows; rows the outer LIMIT
# drops are unlocked when the statement's transaction ends, a moment later.
#
# Limited jobs are never taken here (see pgq.limits; LIMITED_LOCK claims them): `NOT j.limited` is part
# of jobs_claim_idx's predicate, and a queue with a row in pgq.limits is skipped altogether (one
# primary-key probe per queue), so a job that slipped into a limited queue unmarked cannot run past
# the limit either.
# A claim's fencing token: random, 52 bits (PostgreSQL 15 and later; 48 before), from the backend's own
# generator, which PostgreSQL seeds from the operating system's strong random source in every new
# backend. Not a sequence and not the attempt number: a claim committed without waiting for the disk
# (synchronous_commit = off, on the server or in the session) can vanish in a crash, and with it the
# WAL that advanced a sequence, so after recovery both would hand the next claim of the same job the
# very value the lost claim's worker still holds, and its writes would pass the fence. Two claims of
# one job draw the same token with a chance of 2^-52.
CLAIM_TOKEN = "floor(random() * 4503599627370496)::bigint"  # noqa: S105 - SQL text, not a password

CLAIM = """
WITH picked AS (
    SELECT c.id
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at FROM pgq.jobs AS j
        WHERE j.status IN ('queued', 'retrying') AND NOT j.limited AND j.queue = q.name AND j.run_at <= now()
        ORDER BY j.priority DESC, j.run_at, j.id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS c
    WHERE NOT EXISTS (SELECT 1 FROM pgq.limits AS l WHERE l.key = 'queue:' || q.name)
    ORDER BY c.priority DESC, c.run_at, c.id
    LIMIT %(limit)s
)
UPDATE pgq.jobs AS j
SET status = 'running', attempts = j.attempts + 1, worker_id = %(worker_id)s, started_at = now(),
    lease_expires_at = now() + make_interval(secs => j.lease_seconds), claim_token = """ + CLAIM_TOKEN + """
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.queue, j.task_name, j.args, j.kwargs, j.priority, j.attempts, j.max_attempts,
          j.retry_backoff, j.lease_seconds, j.ignore_result, j.claim_token
"""

# --- limits (pgq.limits): the limited claim and the declarations ----------------------------------

# The tokens a limits row `l` holds at this statement's time: refilled at `rate` per second since
# `refilled_at`, up to `burst`. statement_timestamp(), not now(): now() is the transaction's start,
# before the lock wait, and would let refilled_at move backwards.
_TOKENS = ("least(l.burst, l.tokens + l.rate * greatest(0, extract(epoch FROM statement_timestamp() - l.refilled_at)"
           "::float8))")

# Are limited jobs due in these queues? A worker asks before a limited claim when none were at its last look.
LIMITED_DUE = """
SELECT EXISTS (
    SELECT 1 FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (SELECT 1 FROM pgq.jobs AS j
                        WHERE j.status IN ('queued', 'retrying') AND j.limited AND j.queue = q.name
                          AND j.run_at <= now()
                        LIMIT 1) AS c
)
"""

# Limited claim, step 1 (pgq.limits.claim): lock up to `limit` due limited jobs per queue that look
# claimable in this statement's snapshot — queue not full and with a token, task with a token, key
# below the job's key_concurrency — and every limits row they depend on: their queue's and task's rows
# if declared, their key's row, created if missing. Limits rows are locked in key order by every
# claimer (the upsert takes them in the order of its input), so claimers queue up instead of
# deadlocking; ON CONFLICT DO UPDATE locks a row even when this snapshot cannot see it. Jobs skipped
# here because their limit looked full are re-read by the next claim. Returns the candidates in claim
# order, each with the array of limits keys locked, and the seconds until the next token of the
# rate-limited rows among `rate_keys` that have none (a row of NULLs then when there is no candidate).
# The task's token check and the look-up of a needed queue or task row are scalar subqueries, one
# primary-key probe per candidate: written as NOT EXISTS / EXISTS, PostgreSQL turned them into an anti
# join and a hashed subplan that read all of pgq.limits (every concurrency key used in the last hour)
# once ANALYZE had seen a backlog of limited jobs (1,000 waiting, 2,000 key rows: PostgreSQL 15 and 18).
LIMITED_LOCK = f"""
WITH cand AS MATERIALIZED (
    SELECT c.*
    FROM (
        SELECT q.name FROM unnest(%(queues)s::text[]) AS q(name)
        LEFT JOIN pgq.limits AS l ON l.key = 'queue:' || q.name
        WHERE l.key IS NULL
           OR ((l.concurrency IS NULL OR l.concurrency > (
                    SELECT count(*) FROM pgq.jobs AS r WHERE r.status = 'running' AND r.limited AND r.queue = q.name))
               AND (l.rate IS NULL OR {_TOKENS} >= 1))
    ) AS q
    CROSS JOIN LATERAL (
        SELECT j.id, j.queue, j.task_name, j.concurrency_key, j.key_concurrency, j.priority, j.run_at
        FROM pgq.jobs AS j
        WHERE j.status IN ('queued', 'retrying') AND j.limited AND j.queue = q.name AND j.run_at <= now()
          AND (j.concurrency_key IS NULL OR j.key_concurrency > (
                   SELECT count(*) FROM pgq.jobs AS r
                   WHERE r.status = 'running' AND r.concurrency_key = j.concurrency_key))
          AND (SELECT {_TOKENS} < 1 FROM pgq.limits AS l
               WHERE l.key = 'task:' || j.task_name AND l.rate IS NOT NULL) IS NOT TRUE
        ORDER BY j.priority DESC, j.run_at, j.id
        LIMIT %(limit)s
        FOR UPDATE OF j SKIP LOCKED
    ) AS c
), needed AS (
    SELECT 'queue:' || queue AS key FROM cand
    UNION SELECT 'task:' || task_name FROM cand
    UNION SELECT 'key:' || concurrency_key FROM cand WHERE concurrency_key IS NOT NULL
), locked AS (
    INSERT INTO pgq.limits AS l (key)
    SELECT n.key FROM needed AS n
    WHERE starts_with(n.key, 'key:') OR (SELECT true FROM pgq.limits AS d WHERE d.key = n.key)
    ORDER BY n.key
    ON CONFLICT (key) DO UPDATE SET updated_at = now()
    RETURNING l.key
)
SELECT c.id, c.queue, c.task_name, c.concurrency_key, c.key_concurrency, (SELECT array_agg(key) FROM locked),
       w.wait
FROM (SELECT min((1 - {_TOKENS}) / l.rate) AS wait FROM pgq.limits AS l
      WHERE l.key = ANY(%(rate_keys)s::text[]) AND l.rate IS NOT NULL AND {_TOKENS} < 1) AS w
LEFT JOIN cand AS c ON true
ORDER BY c.priority DESC, c.run_at, c.id
"""

# Limited claim, step 2: the locked limits rows as they are now. A NEW statement on purpose: under
# READ COMMITTED a statement's snapshot is taken when it starts, and LIMITED_LOCK's was taken before it
# waited for these rows; the previous holder's claims, committed during that wait, are invisible to it.
# This snapshot is taken with the locks held, so it sees every committed claim under these limits, and
# none can commit before ours. Running counts come from `status = 'running'` rows (jobs finishing only
# lower them); a key's limit comes with each job, so for keys only the count is returned.
LIMITS_STATE = f"""
SELECT l.key, l.concurrency,
       CASE WHEN starts_with(l.key, 'key:') THEN
                (SELECT count(*) FROM pgq.jobs AS j WHERE j.status = 'running' AND j.concurrency_key = substr(l.key, 5))
            WHEN starts_with(l.key, 'queue:') AND l.concurrency IS NOT NULL THEN
                (SELECT count(*) FROM pgq.jobs AS j
                 WHERE j.status = 'running' AND j.limited AND j.queue = substr(l.key, 7))
       END,
       l.rate, CASE WHEN l.rate IS NOT NULL THEN {_TOKENS} END
FROM pgq.limits AS l
WHERE l.key = ANY(%(keys)s::text[])
"""

# Limited claim, step 3: claim the admitted jobs (locked by step 1) and take one token per job from each
# rate-limited row over it (refilled to this statement's time first). started_at and the lease use
# statement_timestamp() too: the moment the tokens were taken, after the lock wait.
LIMITED_TAKE = f"""
WITH spent AS (
    UPDATE pgq.limits AS l
    SET tokens = {_TOKENS} - s.taken, refilled_at = statement_timestamp()
    FROM unnest(%(keys)s::text[], %(taken)s::int[]) AS s(key, taken)
    WHERE l.key = s.key AND l.rate IS NOT NULL
)
UPDATE pgq.jobs AS j
SET status = 'running', attempts = j.attempts + 1, worker_id = %(worker_id)s, started_at = statement_timestamp(),
    lease_expires_at = statement_timestamp() + make_interval(secs => j.lease_seconds),
    claim_token = {CLAIM_TOKEN}
WHERE j.id = ANY(%(ids)s::bigint[]) AND j.status IN ('queued', 'retrying')
RETURNING j.id, j.queue, j.task_name, j.args, j.kwargs, j.priority, j.attempts, j.max_attempts,
          j.retry_backoff, j.lease_seconds, j.ignore_result, j.claim_token
"""

# Outcomes of limited jobs are being recorded: at commit, wake the workers of their queues, so that any
# of them with an idle runner takes the freed slot at once (their limited claim otherwise runs on an
# enqueue's NOTIFY or on the poll interval). Sent in the recording transaction: nobody wakes before
# the slot is free.
LIMITS_FREED = "SELECT pg_notify('pgq_jobs', 'limited ' || q) FROM unnest(%(queues)s::text[]) AS q"

# Declare limits (a worker at start, app.declare_limits()): a new row starts with a full bucket; a row
# is rewritten only where the declaration differs, its tokens capped at the new burst. Rows are written
# in key order, the order claimers lock them in. Returns the keys written.
LIMITS_DECLARE = """
INSERT INTO pgq.limits AS l (key, concurrency, rate, burst, tokens)
SELECT d.key, d.concurrency, d.rate, d.burst, d.burst
FROM unnest(%(keys)s::text[], %(concurrency)s::int[], %(rate)s::float8[], %(burst)s::float8[])
     AS d(key, concurrency, rate, burst)
ORDER BY d.key
ON CONFLICT (key) DO UPDATE
SET concurrency = excluded.concurrency, rate = excluded.rate, burst = excluded.burst,
    tokens = least(l.tokens, excluded.burst), updated_at = now()
WHERE (l.concurrency, l.rate, l.burst) IS DISTINCT FROM (excluded.concurrency, excluded.rate, excluded.burst)
RETURNING l.key
"""

# A queue's limit was just declared: its waiting jobs go through the limited claim from now on.
LIMITS_MARK_QUEUES = """
UPDATE pgq.jobs SET limited = true
WHERE status IN ('queued', 'retrying') AND NOT limited AND queue = ANY(%(queues)s::text[])
"""

# A task's limit was just declared: its waiting jobs go through the limited claim from now on. No index
# has task_name: this reads every waiting job, once per new declaration.
LIMITS_MARK_TASKS = """
UPDATE pgq.jobs SET limited = true
WHERE status IN ('queued', 'retrying') AND NOT limited AND task_name = ANY(%(tasks)s::text[])
"""

# Mark waiting jobs of limited queues (among `queues`) that were enqueued unmarked: their producer's
# statement began just before the queue's limit was declared. Neither claim takes them meanwhile.
# Cheap when there are none: one probe of jobs_claim_idx per limited queue.
LIMITS_SWEEP = """
UPDATE pgq.jobs SET limited = true
WHERE status IN ('queued', 'retrying') AND NOT limited
  AND queue = ANY(ARRAY(SELECT q FROM unnest(%(queues)s::text[]) AS q
                        WHERE EXISTS (SELECT 1 FROM pgq.limits AS l WHERE l.key = 'queue:' || q)))
"""

# Forget key rows no claim has used for `keep` seconds (the next claim that needs one creates it again),
# and queue or task rows that limit nothing. SKIP LOCKED: never waits for, or removes, a row a claim holds.
LIMITS_PRUNE = """
WITH old AS (
    SELECT key FROM pgq.limits
    WHERE CASE WHEN starts_with(key, 'key:') THEN updated_at < now() - make_interval(secs => %(keep)s::float8)
               ELSE concurrency IS NULL AND rate IS NULL END
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
)
DELETE FROM pgq.limits AS l USING old WHERE l.key = old.key
"""

# `pgq limits`: every declared limit (and with `with_keys`, the keys claimed in the last hour), with the
# jobs running under it and the tokens available now.
LIMITS_LIST = f"""
SELECT l.key, l.concurrency,
       CASE WHEN starts_with(l.key, 'queue:') THEN
                (SELECT count(*) FROM pgq.jobs AS j
                 WHERE j.status = 'running' AND j.limited AND j.queue = substr(l.key, 7))
            WHEN starts_with(l.key, 'key:') THEN
                (SELECT count(*) FROM pgq.jobs AS j WHERE j.status = 'running' AND j.concurrency_key = substr(l.key, 5))
       END,
       l.rate, l.burst, CASE WHEN l.rate IS NOT NULL THEN {_TOKENS} END, l.updated_at
FROM pgq.limits AS l
WHERE NOT starts_with(l.key, 'key:') OR (%(with_keys)s AND l.updated_at > now() - interval '1 hour')
ORDER BY l.key
"""

# The fence of every write for one attempt: `id = … AND claim_token = … AND lease_expires_at IS NOT NULL`.
# A lease exists exactly while the job is running (CHECK jobs_lease_running_check, migration 0006), so
# this says "still running under the same claim". The token, not the attempt number: a claim that a
# database crash undid leaves its attempt number to be taken again by the next claim (see CLAIM_TOKEN).
# It is spelled with the lease, not with `status = 'running'`, on purpose: that spelling matches
# jobs_lease_idx's predicate, and once ANALYZE has seen a backlog with almost nothing running,
# PostgreSQL drives these statements from that index (a hash join over all of it) instead of from the
# primary key. The index's dead entries grow during a drain, so each batch read more of them: 500-640 us
# of PostgreSQL CPU per job, 1,450-1,800 jobs/s on one worker, against 20,000+ with the primary-key plan
# (benchmarks/run.py, drain of 20,000).
#
# The batched writes (COMPLETE_MANY, EXTEND_LEASES, RELEASE) are driven from their array of ids, whatever
# the statistics say. Once ANALYZE has seen a backlog with no lease set (autovacuum's autoanalyze does
# on every busy queue), PostgreSQL estimates that no row passes the fence, and a plan that reads pgq.jobs
# first looks free. Joined to `unnest(ids, tokens)`, the plan made with a batch's values (the first five
# executions of a prepared statement, and every one with --no-prepare) read the whole table for 300 ids
# on 20,000 waiting jobs: all of jobs_pkey where sequential scans are off (a worker's connection), a
# sequential scan elsewhere; 40-48 ms on PostgreSQL 15 and 18 (EXPLAIN ANALYZE), growing with the
# table, against a few ms for the generic plan, which looks each id up. So `id = ANY(ids)` is the only
# way in: a search of the primary key, while a scan would compare every row with every id, which the
# planner prices in. The token is then checked without a join: with `id = ANY(ids)` beside the join, the
# one-row estimate made it a nested loop over the whole batch for every row (90,000 comparisons for
# 300 ids; 30 ms as a generic plan). Each row looks its token up in a map of the batch, id -> token,
# built once per statement (an InitPlan, jsonb_object_agg): about 2.7 us per row (450 ids: 1.2 ms over
# the bare scan; array_position, a linear search per row, cost 7 ms, 15 us of PostgreSQL CPU per job in
# a drain). tests/test_plans.py checks every hot statement's plan on an analyzed backlog, on each
# server it runs on.

# Record many successes at once, fenced: only rows still `running` under the same claim change.
# Returns the ids that were recorded; a missing id means this worker had lost that job's lease.
COMPLETE_MANY = """
WITH done AS (
    UPDATE pgq.jobs AS j
    SET status = 'succeeded', finished_at = now(), lease_expires_at = NULL
    WHERE j.id = ANY(%(ids)s::bigint[]) AND j.lease_expires_at IS NOT NULL
      AND j.claim_token = ((SELECT jsonb_object_agg(d.id, d.token)
                            FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS d(id, token))
                           ->> j.id::text)::bigint
    RETURNING j.id, j.ignore_result
), saved AS (
    INSERT INTO pgq.results (job_id, status, result)
    SELECT r.id, 'succeeded', r.result::jsonb
    FROM unnest(%(ids)s::bigint[], %(results)s::text[]) AS r(id, result)
    JOIN done ON done.id = r.id AND NOT done.ignore_result
    ON CONFLICT (job_id) DO UPDATE
    SET status = excluded.status, result = excluded.result, error_type = NULL, error_message = NULL,
        traceback = NULL, created_at = now()
)
SELECT id FROM done
"""

# One failed attempt that will be tried again after `delay` seconds, fenced like COMPLETE_MANY. A job
# whose cancellation was requested meanwhile is not handed back: it ends `cancelled` instead.
RETRY = """
WITH retried AS (
    UPDATE pgq.jobs
    SET status = CASE WHEN cancel_requested_at IS NULL THEN 'retrying' ELSE 'cancelled' END,
        finished_at = CASE WHEN cancel_requested_at IS NULL THEN finished_at ELSE now() END,
        lease_expires_at = NULL,
        run_at = now() + make_interval(secs => %(delay)s::float8),
        last_error = %(error)s,
        errors = errors || jsonb_build_array(%(entry)s::jsonb || jsonb_build_object('at', now()))
    WHERE id = %(id)s AND claim_token = %(token)s AND lease_expires_at IS NOT NULL
    RETURNING id, status, attempts
), cancelled AS (
    INSERT INTO pgq.results (job_id, status, error_type, error_message)
    SELECT id, 'cancelled', 'TaskCancelled', 'cancelled while running (attempt ' || attempts || ')'
    FROM retried WHERE status = 'cancelled'
    ON CONFLICT (job_id) DO UPDATE
    SET status = excluded.status, result = NULL, error_type = excluded.error_type,
        error_message = excluded.error_message, traceback = NULL, created_at = now()
)
SELECT id FROM retried
"""

# The job ends `failed` (attempts exhausted, or it can never succeed), with its error kept for get().
FAIL = """
WITH failed AS (
    UPDATE pgq.jobs
    SET status = 'failed', finished_at = now(), lease_expires_at = NULL, last_error = %(error)s,
        errors = errors || jsonb_build_array(%(entry)s::jsonb || jsonb_build_object('at', now()))
    WHERE id = %(id)s AND claim_token = %(token)s AND lease_expires_at IS NOT NULL
    RETURNING id
)
INSERT INTO pgq.results (job_id, status, error_type, error_message, traceback)
SELECT id, 'failed', %(error_type)s, %(error_message)s, %(traceback)s FROM failed
ON CONFLICT (job_id) DO UPDATE
SET status = excluded.status, result = NULL, error_type = excluded.error_type,
    error_message = excluded.error_message, traceback = excluded.traceback, created_at = now()
RETURNING job_id
"""

# A running attempt ended by its cancellation (the worker learned of the request on its heartbeat), fenced
# like FAIL. The job ends `cancelled`, with the attempt in its error history.
CANCEL_RUNNING = """
WITH cancelled AS (
    UPDATE pgq.jobs
    SET status = 'cancelled', finished_at = now(), lease_expires_at = NULL,
        cancel_requested_at = coalesce(cancel_requested_at, now()),
        errors = errors || jsonb_build_array(%(entry)s::jsonb || jsonb_build_object('at', now()))
    WHERE id = %(id)s AND claim_token = %(token)s AND lease_expires_at IS NOT NULL
    RETURNING id
)
INSERT INTO pgq.results (job_id, status, error_type, error_message)
SELECT id, 'cancelled', 'TaskCancelled', %(message)s FROM cancelled
ON CONFLICT (job_id) DO UPDATE
SET status = excluded.status, result = NULL, error_type = excluded.error_type,
    error_message = excluded.error_message, traceback = NULL, created_at = now()
RETURNING job_id
"""

# Heartbeat: push the leases of the jobs this worker is running further out. Returns the ids still
# held, each with whether its cancellation was requested; any other id was rescued and possibly
# re-claimed elsewhere (this worker was frozen too long).
EXTEND_LEASES = """
UPDATE pgq.jobs AS j
SET lease_expires_at = now() + make_interval(secs => j.lease_seconds)
WHERE j.id = ANY(%(ids)s::bigint[]) AND j.lease_expires_at IS NOT NULL
  AND j.claim_token = ((SELECT jsonb_object_agg(d.id, d.token)
                        FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS d(id, token))
                       ->> j.id::text)::bigint
RETURNING j.id, j.cancel_requested_at IS NOT NULL
"""

# Undo claims of jobs that never started (shutdown): the attempt is given back, so a clean restart
# costs a job nothing. A job whose cancellation was requested ends `cancelled` instead.
RELEASE = """
WITH released AS (
    UPDATE pgq.jobs AS j
    SET status = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                      WHEN j.attempts > 1 THEN 'retrying' ELSE 'queued' END,
        finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL THEN now() ELSE j.finished_at END,
        attempts = j.attempts - 1, lease_expires_at = NULL, worker_id = NULL
    WHERE j.id = ANY(%(ids)s::bigint[]) AND j.lease_expires_at IS NOT NULL
      AND j.claim_token = ((SELECT jsonb_object_agg(d.id, d.token)
                            FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS d(id, token))
                           ->> j.id::text)::bigint
    RETURNING j.id, j.status
), cancelled AS (
    INSERT INTO pgq.results (job_id, status, error_type, error_message)
    SELECT id, 'cancelled', 'TaskCancelled', 'cancelled before it ran' FROM released WHERE status = 'cancelled'
    ON CONFLICT (job_id) DO UPDATE
    SET status = excluded.status, result = NULL, error_type = excluded.error_type,
        error_message = excluded.error_message, traceback = NULL, created_at = now()
)
SELECT id FROM released
"""

# Rescue jobs whose lease expired (their worker was killed, lost its machine, or froze): the attempt
# counts, and a job lost on its last attempt ends `failed` with a reason that says so (and one whose
# cancellation was requested ends `cancelled`). SKIP LOCKED and the re-checked WHERE make it safe for
# every worker to run this at once, without advisory locks. The UPDATE re-checks the lease, not `status =
# 'running'` (the same thing, see the fence above COMPLETE_MANY): with the status, once ANALYZE had seen
# nothing running, PostgreSQL read all of jobs_lease_idx for the rows to update instead of looking up
# the few expired ids by primary key.
#
# A rescued job is due at once (run_at = now()), not after the task's failure backoff: nothing was
# wrong with the job, its worker was lost. With the backoff (retry_backoff ** attempts), a job rescued
# for the 5th time waited 32 s more: 20 SIGKILLs of busy workers (lease 5 s, rescue and poll interval
# 1 s, retry_backoff 2) took 51.9 s from the kill to the job's next start at p95, against the 7 s the
# lease and the intervals allow; due at once, 4.8 s at p50 and 5.1 s at p95 (benchmarks/recovery.py,
# the same settings). No delay is needed to hold back a job that kills its worker on every
# attempt: the lease already spaces its attempts, since a lost attempt cannot be rescued before its
# lease runs out (at least lease_seconds after its last heartbeat, 30 s by default), and max_attempts
# ends it. run_at = now() (not the job's old run_at) puts it behind jobs of its priority already due,
# as every retry is, and keeps "waited" (started_at - run_at) the wait of this attempt.
#
# The queues of the jobs made due get a NOTIFY (payloads as the jobs_notify trigger sends them;
# identical ones fold into one per queue at commit), so an idle worker on any host takes them at once
# instead of at its next poll; the rescuing worker also wakes its own claim loop (Keeper.run_once).
RESCUE = """
WITH expired AS (
    SELECT id FROM pgq.jobs
    WHERE status = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), rescued AS (
    UPDATE pgq.jobs AS j
    SET status = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                      WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'retrying' END,
        finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL OR j.attempts >= j.max_attempts THEN now() END,
        run_at = now(),
        lease_expires_at = NULL,
        last_error = CASE WHEN j.attempts >= j.max_attempts
            THEN 'lost its worker on every attempt (' || j.attempts || ' of ' || j.max_attempts
                 || '): the lease expired each time; the task may be killing or hanging its worker'
            ELSE 'lease expired on attempt ' || j.attempts || ' of ' || j.max_attempts
                 || ': worker ' || coalesce(j.worker_id, '?')
                 || ' stopped heartbeating (killed, crashed or partitioned)'
        END,
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts, 'at', now(), 'type', 'LeaseExpired', 'worker', j.worker_id,
            'message', 'lease expired: worker ' || coalesce(j.worker_id, '?') || ' stopped heartbeating'))
    FROM expired
    WHERE j.id = expired.id AND j.lease_expires_at IS NOT NULL
    RETURNING j.id, j.status, j.task_name, j.attempts, j.max_attempts, j.last_error,
              CASE WHEN j.status = 'retrying'
                   THEN pg_notify('pgq_jobs', CASE WHEN j.limited THEN 'limited ' ELSE '' END || j.queue) END
), saved AS (
    INSERT INTO pgq.results (job_id, status, error_type, error_message)
    SELECT id, status, CASE status WHEN 'failed' THEN 'LeaseExpired' ELSE 'TaskCancelled' END,
           CASE status WHEN 'failed' THEN last_error
                ELSE 'cancelled while running (attempt ' || attempts || '; its worker was lost)' END
    FROM rescued WHERE status IN ('failed', 'cancelled')
    ON CONFLICT (job_id) DO UPDATE
    SET status = excluded.status, result = NULL, error_type = excluded.error_type,
        error_message = excluded.error_message, traceback = NULL, created_at = now()
)
SELECT id, status, task_name, attempts, max_attempts FROM rescued
"""

# A worker announces itself, and refreshes its row on every heartbeat.
WORKER_HEARTBEAT = """
INSERT INTO pgq.workers (id, hostname, pid, queues, concurrency)
VALUES (%(id)s, %(hostname)s, %(pid)s, %(queues)s::jsonb, %(concurrency)s)
ON CONFLICT (id) DO UPDATE SET last_heartbeat_at = now()
"""

WORKER_DEREGISTER = "DELETE FROM pgq.workers WHERE id = %(id)s"

# Workers that have not heartbeated for a long time are gone (killed); forget them.
WORKERS_FORGET_STALE = """
DELETE FROM pgq.workers WHERE last_heartbeat_at < now() - make_interval(secs => %(after)s::float8)
"""

# What get() and .status read: the job's state and its stored outcome, in one round trip.
FETCH_RESULT = """
SELECT j.status, r.status, r.result, r.error_type, r.error_message, r.traceback
FROM (SELECT %(id)s::bigint AS id) AS q
LEFT JOIN pgq.jobs AS j ON j.id = q.id
LEFT JOIN pgq.results AS r ON r.job_id = q.id
"""

# `pgq status`: jobs per queue and state, and how long the oldest waiting job has been due.
STATUS_COUNTS = """
SELECT queue, status, count(*) AS jobs,
       max(now() - run_at) FILTER (WHERE status IN ('queued', 'retrying') AND run_at <= now()) AS oldest_due
FROM pgq.jobs
GROUP BY queue, status
ORDER BY queue, status
"""

# Worker rows, with how long ago each heartbeated (a killed worker's row stays until it is forgotten).
WORKERS = """
SELECT id, hostname, pid, queues, concurrency, started_at, now() - last_heartbeat_at AS since_heartbeat
FROM pgq.workers ORDER BY started_at
"""

# --- job control (pgq.control): cancel, retry by hand ------------------------------------------------

# Cancel jobs: a waiting one ends `cancelled` at once (it never runs); a running one keeps running with
# cancel_requested_at set, which its worker learns on its next heartbeat (EXTEND_LEASES), and every
# statement that would hand it back ends it `cancelled` instead. One UPDATE, so a concurrent claim or
# completion is re-checked on the row's new version: a job claimed meanwhile is asked to stop, one that
# finished meanwhile is left alone. Returns each id with its status after this statement (NULL: no such
# job) and whether this statement changed it.
CANCEL = """
WITH changed AS (
    UPDATE pgq.jobs
    SET status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
        finished_at = CASE WHEN status = 'running' THEN finished_at ELSE now() END,
        cancel_requested_at = coalesce(cancel_requested_at, now())
    WHERE id = ANY(%(ids)s::bigint[]) AND status IN ('queued', 'retrying', 'running')
    RETURNING id, status, attempts
), saved AS (
    INSERT INTO pgq.results (job_id, status, error_type, error_message)
    SELECT id, 'cancelled', 'TaskCancelled',
           CASE WHEN attempts = 0 THEN 'cancelled before it ran'
                ELSE 'cancelled while waiting to be retried (after attempt ' || attempts || ')' END
    FROM changed WHERE status = 'cancelled'
    ON CONFLICT (job_id) DO UPDATE
    SET status = excluded.status, result = NULL, error_type = excluded.error_type,
        error_message = excluded.error_message, traceback = NULL, created_at = now()
)
SELECT q.id, coalesce(c.status, j.status), c.id IS NOT NULL
FROM unnest(%(ids)s::bigint[]) AS q(id)
LEFT JOIN changed AS c ON c.id = q.id
LEFT JOIN pgq.jobs AS j ON j.id = q.id
"""

# Retry failed or cancelled jobs by hand: due now, with a fresh budget of attempts, its stored outcome
# deleted; the error history is kept, with a note. `attempts` is NOT reset: attempt numbers stay unique in
# the job's error history, and a worker frozen on an old attempt is told apart by its claim token.
# Instead `max_attempts` grows by the job's budget per run (max_attempts minus the attempts already used
# when it was last retried by hand, which the previous ManualRetry entry records). NOTIFY wakes
# the workers (identical notifications fold into one per queue). A job whose unique key another job
# holds now is left alone. Returns each id with its status after this statement (NULL: no such job)
# and whether this statement requeued it.
REQUEUE = """
WITH requeued AS (
    UPDATE pgq.jobs AS j
    SET status = 'queued', run_at = now(), finished_at = NULL, lease_expires_at = NULL,
        worker_id = NULL, cancel_requested_at = NULL,
        max_attempts = j.attempts + greatest(1, j.max_attempts - coalesce(
            (SELECT max((e->>'attempt')::int) FROM jsonb_array_elements(j.errors) AS e
             WHERE e->>'type' = 'ManualRetry'), 0)),
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts, 'at', now(), 'type', 'ManualRetry',
            'message', 'retried by hand after ' || j.attempts || ' attempt(s) ended ' || j.status))
    WHERE j.id = ANY(%(ids)s::bigint[]) AND j.status IN ('failed', 'cancelled')
      AND (j.unique_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM pgq.jobs AS o
          WHERE o.unique_key = j.unique_key AND o.status IN ('queued', 'retrying', 'running')))
    -- workers wake at commit, once per queue (payloads as the jobs_notify trigger sends them)
    RETURNING j.id, j.status, pg_notify('pgq_jobs', CASE WHEN j.limited THEN 'limited ' ELSE '' END || j.queue)
), dropped AS (
    DELETE FROM pgq.results AS r USING requeued WHERE r.job_id = requeued.id
)
SELECT q.id, coalesce(r.status, j.status), r.id IS NOT NULL
FROM unnest(%(ids)s::bigint[]) AS q(id)
LEFT JOIN requeued AS r ON r.id = q.id
LEFT JOIN pgq.jobs AS j ON j.id = q.id
"""

# The status of these jobs, for the ones pgq.control could not change.
JOB_STATUSES = "SELECT id, status, false FROM pgq.jobs WHERE id = ANY(%(ids)s::bigint[])"

# `pgq retry --failed --task T [--queue Q]`: the next batch of matching jobs after id `after`, by id
# (REQUEUE then requeues them; a batch at a time keeps each transaction short).
REQUEUE_PICK = """
SELECT id FROM pgq.jobs
WHERE status = ANY(%(statuses)s::text[]) AND task_name = %(task_name)s
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text) AND id > %(after)s
ORDER BY id
LIMIT %(limit)s
"""

# Is pgq's schema there? Then SCHEMA_VERSION says at which revision.
SCHEMA_EXISTS = "SELECT to_regclass('pgq.alembic_version') IS NOT NULL"
SCHEMA_VERSION = "SELECT version_num FROM pgq.alembic_version"

# --- periodic tasks (pgq.periodic) ------------------------------------------------------------------

# What a scheduler pass starts from: the database's now, and the latest tick enqueued of each schedule
# (a backward scan of the primary key per name).
PERIODIC_LAST_TICKS = """
SELECT now(), s.name, (SELECT max(t.tick_at) FROM pgq.periodic_ticks AS t WHERE t.schedule = s.name)
FROM unnest(%(names)s::text[]) AS s(name)
"""

# Claim due ticks: the primary key (schedule, tick_at) lets exactly one scheduler's insert of a tick win;
# the losers' inserts wait for the winner's commit and then do nothing. The returned ticks are this
# scheduler's to enqueue, in the same transaction. A tick at or before one already recorded is never
# claimed, so a slow scheduler cannot fire a tick that a faster one skipped, or one whose row was pruned.
PERIODIC_CLAIM_TICKS = """
INSERT INTO pgq.periodic_ticks (schedule, tick_at, task_name, enqueued_by)
SELECT %(schedule)s, d.tick_at, %(task_name)s, %(enqueued_by)s
FROM unnest(%(ticks)s::timestamptz[]) AS d(tick_at)
WHERE NOT EXISTS (SELECT 1 FROM pgq.periodic_ticks AS p
                  WHERE p.schedule = %(schedule)s AND p.tick_at >= d.tick_at)
ORDER BY d.tick_at
ON CONFLICT (schedule, tick_at) DO NOTHING
RETURNING tick_at
"""

# Enqueue the job of a tick claimed earlier in this transaction, and note its id on the tick row.
PERIODIC_ENQUEUE = f"""
WITH job AS ({ENQUEUE.strip()})
UPDATE pgq.periodic_ticks AS t SET job_id = job.id
FROM job
WHERE t.schedule = %(schedule)s AND t.tick_at = %(tick_at)s
RETURNING job.id
"""

# Forget ticks enqueued long ago, except the latest of each schedule (where its next tick starts).
# SKIP LOCKED lets every scheduler run it at once.
PERIODIC_PRUNE = """
WITH old AS (
    SELECT t.schedule, t.tick_at FROM pgq.periodic_ticks AS t
    WHERE t.created_at < now() - make_interval(secs => %(keep)s::float8)
      AND EXISTS (SELECT 1 FROM pgq.periodic_ticks AS n WHERE n.schedule = t.schedule AND n.tick_at > t.tick_at)
    ORDER BY t.created_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM pgq.periodic_ticks AS t USING old
WHERE t.schedule = old.schedule AND t.tick_at = old.tick_at
"""

# `pgq periodic list`: the latest tick of every schedule the database knows, with its job's state.
PERIODIC_LIST = """
SELECT l.schedule, l.task_name, l.tick_at, l.job_id, j.status, l.enqueued_by
FROM (SELECT DISTINCT ON (schedule) schedule, task_name, tick_at, job_id, enqueued_by
      FROM pgq.periodic_ticks ORDER BY schedule, tick_at DESC) AS l
LEFT JOIN pgq.jobs AS j ON j.id = l.job_id
ORDER BY l.schedule
"""

DB_NOW = "SELECT now()"

# --- retention (pgq.pruner) --------------------------------------------------------------------------

# Delete one batch of jobs of one finished state that finished more than `keep` seconds ago, oldest first,
# with their results. The literal `status IN (…)` lets even a generic plan use jobs_finished_idx (whose
# predicate it is). That index holds every finished state, so each batch starts where the previous one of
# its state ended (`after`, the last finished_at it deleted): the rows of other states it stepped over are
# not walked again (without it, pruning 900,000 successes among 100,000 other jobs took 12 s, not 2.2 s).
# SKIP LOCKED passes rows a retry by hand or another pruner holds. `= ANY(ARRAY(…))` deletes by primary key
# (a join let the planner hash the CTE and scan all of pgq.results per batch). Run in autocommit: each
# batch is its own short transaction, whose id is returned with what it deleted.
PRUNE_BATCH = """
WITH doomed AS (
    SELECT id, finished_at FROM pgq.jobs
    WHERE status IN ('succeeded', 'failed', 'cancelled') AND status = %(status)s
      AND finished_at < now() - make_interval(secs => %(keep)s::float8)
      AND finished_at >= coalesce(%(after)s::timestamptz, '-infinity')
    ORDER BY finished_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), deleted_jobs AS (
    DELETE FROM pgq.jobs WHERE id = ANY(ARRAY(SELECT id FROM doomed))
    RETURNING id
), deleted_results AS (
    DELETE FROM pgq.results WHERE job_id = ANY(ARRAY(SELECT id FROM deleted_jobs))
    RETURNING job_id
)
SELECT (SELECT count(*) FROM deleted_jobs), (SELECT count(*) FROM deleted_results), pg_current_xact_id()::text,
       (SELECT max(finished_at) FROM doomed)
"""

# `pgq prune --dry-run`: how many jobs of one finished state PRUNE_BATCH would delete, and the oldest.
PRUNE_COUNT = """
SELECT count(*), min(finished_at) FROM pgq.jobs
WHERE status IN ('succeeded', 'failed', 'cancelled') AND status = %(status)s
  AND finished_at < now() - make_interval(secs => %(keep)s::float8)
"""

# Take a maintenance round (`prune`) if it is due: the one caller whose upsert finds next_run_at passed
# moves it `interval` seconds on and gets the round's start time back; concurrent callers wait on the row
# lock for that commit, then see the new next_run_at and get no row. No advisory lock, so it works behind
# PgBouncer in transaction mode; the first caller ever creates the row.
MAINTENANCE_CLAIM = """
INSERT INTO pgq.maintenance_runs AS m (name, next_run_at, last_started_at, last_run_by)
VALUES (%(name)s, now() + make_interval(secs => %(interval)s::float8), now(), %(run_by)s)
ON CONFLICT (name) DO UPDATE
SET next_run_at = excluded.next_run_at, last_started_at = excluded.last_started_at,
    last_run_by = excluded.last_run_by
WHERE m.next_run_at <= now()
RETURNING m.last_started_at
"""

# A round ended: note what it deleted; a round that stopped with work left makes the next one due now.
MAINTENANCE_DONE = """
UPDATE pgq.maintenance_runs
SET last_finished_at = now(), last_deleted = %(deleted)s,
    next_run_at = CASE WHEN %(more)s THEN now() ELSE next_run_at END
WHERE name = %(name)s AND last_run_by = %(run_by)s AND last_started_at = %(started_at)s
"""

# `pgq doctor`: the rounds, when they ran last and what they did.
MAINTENANCE_RUNS = """
SELECT name, next_run_at, last_started_at, last_finished_at, last_run_by, last_deleted,
       now() - last_started_at AS since_started
FROM pgq.maintenance_runs ORDER BY name
"""

# --- inspection (pgq jobs, pgq workers) ----------------------------------------------------------------

# `pgq jobs list`: newest first (a backward walk of the primary key; the filters are checked on the way).
# A NULL filter is no filter. Ages are in seconds on the database clock.
JOBS_LIST = """
SELECT id, queue, task_name, status, attempts, max_attempts, priority, created_at, run_at, started_at,
       finished_at, worker_id, last_error, now() AS now
FROM pgq.jobs
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(task)s::text IS NULL OR task_name = %(task)s::text)
  AND (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
  AND (%(older)s::float8 IS NULL OR created_at < now() - make_interval(secs => %(older)s::float8))
  AND (%(newer)s::float8 IS NULL OR created_at >= now() - make_interval(secs => %(newer)s::float8))
ORDER BY id DESC
LIMIT %(limit)s OFFSET %(offset)s
"""

# `pgq jobs show ID`: the job, its stored outcome, and the database's now for ages.
JOB_SHOW = """
SELECT j.id, j.queue, j.task_name, j.status, j.args, j.kwargs, j.priority, j.attempts, j.max_attempts,
       j.retry_backoff, j.lease_seconds, j.ignore_result, j.unique_key, j.created_at, j.run_at, j.started_at,
       j.finished_at, j.lease_expires_at, j.cancel_requested_at, j.worker_id, j.last_error, j.errors,
       r.status AS result_status, r.result, r.error_type, r.error_message, r.traceback,
       r.created_at AS result_at, now() AS now
FROM pgq.jobs AS j
LEFT JOIN pgq.results AS r ON r.job_id = j.id
WHERE j.id = %(id)s
"""

# `pgq workers`: every worker row (killed workers' rows stay a while), with the jobs each is running.
WORKERS_LIST = """
SELECT w.id, w.hostname, w.pid, w.queues, w.concurrency, w.started_at, w.last_heartbeat_at,
       now() - w.last_heartbeat_at AS since_heartbeat,
       (SELECT count(*) FROM pgq.jobs AS j WHERE j.status = 'running' AND j.worker_id = w.id) AS running_jobs
FROM pgq.workers AS w
ORDER BY w.started_at, w.id
"""

# --- pgq doctor (pgq.doctor) ---------------------------------------------------------------------------

# Sessions that may hold back the xmin horizon (vacuum cannot remove row versions newer than their
# snapshot or transaction) of this database: transactions older than `max_xact`, and sessions idle in a
# transaction for longer than `max_idle`. Autovacuum's own transactions do not hold it back.
DOCTOR_SESSIONS = """
SELECT pid, usename, application_name, client_addr::text, backend_type, state,
       now() - xact_start AS xact_age, now() - state_change AS state_age,
       backend_xmin IS NOT NULL OR backend_xid IS NOT NULL AS holds_xmin,
       age(coalesce(backend_xmin, backend_xid)) AS xmin_age, left(query, 1000) AS query
FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND xact_start IS NOT NULL
  AND (datname = current_database() OR backend_type = 'walsender')
  AND backend_type NOT LIKE 'autovacuum%%'
  AND ((state LIKE 'idle in transaction%%' AND now() - state_change > make_interval(secs => %(max_idle)s::float8))
       OR ((backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
           AND now() - xact_start > make_interval(secs => %(max_xact)s::float8)))
ORDER BY xact_start
"""

# Replication slots: an inactive one keeps its xmin (holding back vacuum everywhere) and its WAL (filling
# the disk) until it is dropped; an active one with an xmin is a standby with hot_standby_feedback.
DOCTOR_SLOTS = """
SELECT slot_name, slot_type, database, active, age(xmin) AS xmin_age, age(catalog_xmin) AS catalog_xmin_age,
       CASE WHEN restart_lsn IS NOT NULL AND NOT pg_is_in_recovery()
            THEN pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) END AS retained_wal_bytes
FROM pg_replication_slots
ORDER BY slot_name
"""

# Prepared transactions (two-phase commit) hold their xmin and locks until COMMIT/ROLLBACK PREPARED.
DOCTOR_PREPARED = """
SELECT gid, database, owner, now() - prepared AS age, age(transaction) AS xmin_age
FROM pg_prepared_xacts
ORDER BY prepared
"""

# Dead row versions and vacuum times of pgq's tables.
DOCTOR_TABLES = """
SELECT relname, n_live_tup, n_dead_tup, last_autovacuum, last_vacuum, autovacuum_count,
       now() - greatest(last_autovacuum, last_vacuum) AS since_vacuum
FROM pg_stat_user_tables
WHERE schemaname = 'pgq'
ORDER BY relname
"""

# Does the claim index exist and is it usable (a failed CREATE INDEX CONCURRENTLY leaves it invalid)?
# With the planner's estimate of pgq.jobs' rows (a sequential scan of a small table is fine).
DOCTOR_CLAIM_INDEX = """
SELECT (SELECT i.indisvalid AND i.indisready FROM pg_index AS i
        WHERE i.indexrelid = to_regclass('pgq.jobs_claim_idx')),
       (SELECT c.reltuples::bigint FROM pg_class AS c WHERE c.oid = to_regclass('pgq.jobs'))
"""

# A queue to plan the claim for: one with waiting jobs, if any.
DOCTOR_SAMPLE_QUEUE = """
SELECT queue FROM pgq.jobs WHERE status IN ('queued', 'retrying') LIMIT 1
"""

# Jobs running past their lease for longer than `after` seconds (live workers rescue them within their
# --rescue-interval), and how many workers are alive to do it.
DOCTOR_STUCK = """
SELECT count(*), max(now() - lease_expires_at),
       (SELECT count(*) FROM pgq.workers WHERE last_heartbeat_at > now() - interval '30 seconds')
FROM pgq.jobs
WHERE status = 'running' AND lease_expires_at < now() - make_interval(secs => %(after)s::float8)
"""
