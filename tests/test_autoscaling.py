"""The autoscaling policy sizes the deployment from the engines' own queue lengths."""

from types import SimpleNamespace

from serving.engine.autoscaling import METRIC, engine_queue_policy, engine_requests

TEXT = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 7.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 12.0
vllm:num_requests_waiting_by_reason{engine="0",reason="x"} 99.0
"""


def ctx(loads, current=2, target=16.0):
    config = SimpleNamespace(get_target_ongoing_requests=lambda: target)
    return SimpleNamespace(aggregated_metrics={METRIC: dict(enumerate(loads))},
                           current_num_replicas=current, target_num_replicas=current, config=config)


def test_engine_requests_counts_running_and_waiting_only():
    assert engine_requests(TEXT) == 19.0


def test_policy_scales_to_queue_over_target():
    assert engine_queue_policy(ctx([40, 30]))[0] == 5      # 70 / 16 → 5
    assert engine_queue_policy(ctx([0, 0]))[0] == 1        # Serve's min/max bound it further
    assert engine_queue_policy(ctx([], current=3))[0] == 3  # no reports yet: keep the count
