"""Where the kafka joiner's time goes on a real broker: cProfile of ``KafkaJoiner.run`` draining a
synthetic backlog (an embedded broker; the run stops once every impression's example is out).
``bench/profile_ingest.py`` profiles the join without Kafka; this one also sees the consumer, the
end-offset requests and the producer.

    PYTHONPATH=. .venv/bin/python bench/profile_joiner.py [--events 60000] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=60_000, help="approximate number of events in the backlog")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    from core.events import Impression
    from core.settings import BrokerSettings, JoinSettings, KafkaSettings, Settings, TopicNames
    from streams.broker import EmbeddedBroker
    from streams.joiner_kafka import KafkaJoiner
    from streams.kafka_io import create_topics, end_offsets
    from streams.replay import replay
    from streams.sources import synthetic_events

    work = Path(tempfile.mkdtemp(prefix="adstream-profile-joiner-"))
    broker = EmbeddedBroker(BrokerSettings(kind="kafka"), data_dir=work / "broker", port=0).start()
    try:
        b = broker.bootstrap
        prefix = f"profile-{uuid.uuid4().hex[:6]}-"
        topics = TopicNames(**{k: prefix + v for k, v in TopicNames().model_dump().items()})
        create_topics(b, topics.all(), 6)
        duration = a.events / 84  # 20 requests/s, ~4.2 events per request
        events = list(synthetic_events(seed=3, duration_s=duration, rps=20, drift="none",
                                       start_time=time.time() - duration - 600))
        n_imp = sum(isinstance(e, Impression) for e in events)
        replay(events, b, topics, progress=False)
        s = Settings(kafka=KafkaSettings(bootstrap=b, topics=topics, partitions=6),
                     join=JoinSettings(attribution_window_s=60, allowed_lateness_s=5))
        joiner = KafkaJoiner(s, b, app_id="profile-" + prefix, idle_flush_s=2.0)
        t0 = time.time()

        def watch() -> None:
            first = None
            while sum(end_offsets(b, topics.examples).values()) < n_imp:
                if first is None and sum(end_offsets(b, topics.examples).values()):
                    first = time.time()
                time.sleep(0.2)
            print(f"{len(events)} events, {n_imp} examples: first example after {(first or t0) - t0:.1f} s, "
                  f"last after {time.time() - t0:.1f} s (the 2 s idle flush included)", flush=True)
            joiner.stop()

        threading.Thread(target=watch, daemon=True).start()
        prof = cProfile.Profile()
        prof.enable()
        joiner.run()
        prof.disable()
        for order in ("cumulative", "tottime"):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(order).print_stats(a.top)
            print(out.getvalue())
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
