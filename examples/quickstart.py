"""pgq end to end, on the embedded PostgreSQL unless PGQ_DATABASE_URL/DATABASE_URL is set.

    pip install -e '.[embedded]' && python examples/quickstart.py

1. migrates pgq's schema;
2. places an order: the order row and its two jobs are written in ONE transaction, so they exist
   together or not at all (a second order is rolled back, and its job never runs);
3. starts a worker, waits for the results, and prints them;
4. shows a failing job retried with backoff and its error as get() reports it.
"""

from __future__ import annotations

import logging
import time

import pgq

app = pgq.App()


@app.task(name="shop.send_receipt")
def send_receipt(order_id: int, email: str) -> str:
    return f"receipt for order {order_id} sent to {email}"


@app.task(name="shop.total", queue="billing")
def total(prices: list[float]) -> float:
    return round(sum(prices), 2)


@app.task(name="shop.charge", bind=True, max_attempts=3, retry_backoff=0.2)
def charge(self, order_id: int) -> str:
    # The payment provider times out on the first attempt; pgq retries with backoff and jitter.
    if self.request.attempt == 1:
        raise TimeoutError("payment provider did not answer")
    return f"order {order_id} charged on attempt {self.request.attempt}"


@app.task(name="shop.refund", max_attempts=2, retry_backoff=0.1)
def refund(order_id: int) -> None:
    raise ValueError(f"order {order_id} was never charged")


def place_order(conn, order_id: int, email: str, prices: list[float], *, commit: bool) -> list[pgq.AsyncResult]:
    """Business write and jobs in one transaction of the caller's own connection."""
    with conn.cursor() as cur:
        cur.execute("INSERT INTO orders (id, email) VALUES (%s, %s)", (order_id, email))
    handles = [
        send_receipt.apply_async(args=(order_id, email), connection=conn),
        total.apply_async(args=(prices,), connection=conn),
        charge.apply_async(args=(order_id,), connection=conn),
    ]
    conn.commit() if commit else conn.rollback()
    return handles


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="  worker log: %(message)s")
    app.migrate()
    with app.connection() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id int PRIMARY KEY, email text)")
        conn.execute("TRUNCATE orders")

    run_id = int(time.time()) % 1_000_000
    with app.connection() as conn:
        kept = place_order(conn, run_id, "ada@example.com", [9.99, 20.01], commit=True)
        dropped = place_order(conn, run_id + 1, "bob@example.com", [1.0], commit=False)
    failing = refund.delay(run_id)

    print("enqueued: 3 jobs committed with order", run_id, "- 3 jobs rolled back with order", run_id + 1)
    started = time.monotonic()
    with app.worker(queues=["default", "billing"], concurrency=4).running():
        for handle in kept:
            print(f"  job {handle.id}: {handle.get(timeout=30)!r}")
        try:
            failing.get(timeout=30)
        except pgq.TaskFailed as exc:
            print(f"  job {failing.id}: failed after retries -> {exc.type_name}: {exc.message}")
    print(f"done in {time.monotonic() - started:.2f} s")

    for handle in dropped:
        try:
            handle.status  # noqa: B018 - the lookup is the point
            raise SystemExit(f"job {handle.id} of the rolled-back order exists!")
        except pgq.JobNotFound:
            pass
    print("rolled-back order: no job exists, none ran")
    with app.connection() as conn:
        rows = conn.execute("SELECT status, count(*) FROM pgq.jobs GROUP BY 1 ORDER BY 1").fetchall()
    print("pgq.jobs by status:", ", ".join(f"{s}={n}" for s, n in rows))


if __name__ == "__main__":
    main()
