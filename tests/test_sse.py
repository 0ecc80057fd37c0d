"""The ingress's one SSE decoder (serving/ingress/sse.py): events split by the network."""

from serving.ingress.sse import SSEDecoder, decode_all

STREAM = (b'data: {"choices": [{"delta": {"content": "h\xc3\xa9"}}]}\n\n'
          b": a comment line\n"
          b"event: message\r\n"
          b"data: first line\r\n"
          b"data:second line\r\n\r\n"
          b"data: [DONE]\n\n")
EVENTS = [b'{"choices": [{"delta": {"content": "h\xc3\xa9"}}]}', b"first line\nsecond line", b"[DONE]"]


def test_a_whole_stream():
    assert decode_all(STREAM) == EVENTS


def test_every_split_point_gives_the_same_events():
    for cut in range(1, len(STREAM)):
        for step in (1, 3, cut):
            decoder = SSEDecoder()
            events = []
            for i in range(0, len(STREAM), step):
                events += decoder.feed(STREAM[i:i + step])
            assert events == EVENTS, (cut, step)


def test_an_unfinished_event_is_not_an_event():
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"partial": tr') == []
    assert decoder.feed(b"ue}\n") == []
    assert decoder.feed(b"\n") == [b'{"partial": true}']
