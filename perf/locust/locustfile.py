"""The original RayFlux benchmark shape, for Locust, against the original API.

20% of users publish with HTTP `POST /publish` (keep-alive), 80% subscribe on
WebSocket `/subscribe`, over TOPICS topics. Publishing and delivery are
reported separately, never as one "RPS":

- `POST /publish`: publish requests, their response time and failures;
- `WS deliver`: one entry per delivered message, its "response time" being the
  latency from the publisher's send time (carried in the message) to arrival;
- at the end, published x subscribers-per-topic against delivered, so lost
  messages show (the original benchmark mixed both into one number and hid
  them).

Run headless (the node on 127.0.0.1:8080):

    .venv/bin/pip install locust websocket-client
    .venv/bin/locust -f perf/locust/locustfile.py --headless -H http://127.0.0.1:8080 \\
        -u 200 -r 50 -t 60s

Tune with environment variables: TOPICS (10), PUBLISH_INTERVAL_S (each
publisher's pause between publishes; 200 users x 20% / 0.114 s is about 350
publishes per second, the original's published load).
Locust's own loop adds latency under load; fluxbench `original` measures the
same shape open-loop with coordinated omission corrected.
"""

import json
import os
import threading
import time
import uuid

import websocket  # websocket-client: gevent-friendly under Locust
from locust import FastHttpUser, User, constant, events, task

TOPICS = int(os.environ.get("TOPICS", "10"))
PUBLISH_INTERVAL_S = float(os.environ.get("PUBLISH_INTERVAL_S", "0.114"))

_counts = {"published": 0, "delivered": 0}
_subscribers = [0] * TOPICS
_published_per_topic = [0] * TOPICS
_lock = threading.Lock()
_next_user = [0]


def _take_topic():
    with _lock:
        n = _next_user[0]
        _next_user[0] += 1
    return n % TOPICS


class Publisher(FastHttpUser):
    """Publishes with the original API, one request at a time."""

    weight = 1
    wait_time = constant(PUBLISH_INTERVAL_S)

    def on_start(self):
        self.topic = _take_topic()

    @task
    def publish(self):
        message = json.dumps({"sent": time.time()})
        body = {"topic": f"locust.{self.topic}", "message": message}
        with self.client.post("/publish", json=body, name="POST /publish", catch_response=True) as r:
            if r.status_code == 200:
                with _lock:
                    _counts["published"] += 1
                    _published_per_topic[self.topic] += 1
                r.success()
            else:
                r.failure(f"status {r.status_code}")


class Subscriber(User):
    """Subscribes on /subscribe and reports each delivery's latency."""

    weight = 4
    wait_time = constant(0)

    def on_start(self):
        self.topic = _take_topic()
        url = self.host.replace("http://", "ws://").rstrip("/") + "/subscribe"
        self.ws = websocket.create_connection(url, timeout=30)
        self.ws.send(json.dumps({"subscriber_id": str(uuid.uuid4()), "topic": f"locust.{self.topic}"}))
        with _lock:
            _subscribers[self.topic] += 1

    def on_stop(self):
        self.ws.close()

    @task
    def receive(self):
        try:
            frame = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return
        arrived = time.time()
        try:
            sent = json.loads(frame)["sent"]
        except (ValueError, KeyError, TypeError):
            return
        with _lock:
            _counts["delivered"] += 1
        events.request.fire(
            request_type="WS",
            name="deliver",
            response_time=(arrived - sent) * 1000.0,
            response_length=len(frame),
            exception=None,
            context={},
        )


@events.test_stop.add_listener
def _report(environment, **_kwargs):
    # Messages published while a topic had N subscribers should arrive N times.
    # Subscribers join during ramp-up, so this is an upper bound on the
    # expected count; compare it with a run that ramps up before publishing.
    expected = sum(p * s for p, s in zip(_published_per_topic, _subscribers))
    print(
        f"published {_counts['published']}, delivered {_counts['delivered']}, "
        f"expected at most {expected} (published x subscribers per topic)"
    )
