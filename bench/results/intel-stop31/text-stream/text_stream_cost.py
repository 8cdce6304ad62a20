"""A round's streamed text, old (the whole answer decoded every round) against new (a window of recent
tokens): an answer of N tokens fed 3 tokens a round, the SmolLM2 tokenizer; microseconds a round, at its end."""
import sys, time
sys.path.insert(0, "/tmp/ts")  # old_text_stream.py: git show 804d9a6:coordinator/text_stream.py > /tmp/ts/old_text_stream.py
from old_text_stream import TextStream as Old
from coordinator.text_stream import TextStream as New
from specdec import models
tok = models.load_tokenizer("smollm2")
text = "The quick brown fox jumps over the lazy dog; naïve café in Zürich, 東京. " * 400
ids = tok.encode(text, add_special_tokens=False)
for n in (128, 512, 2000, 8000):
    answer = ids[:n]
    for stop in ([], ["</answer>"]):
        for name, cls in (("old", Old), ("new", New)):
            stream, out, times = cls(tok, stop), [], []
            for fed in range(3, n + 1, 3):
                t = time.perf_counter()
                stream.stop_cut(answer[:fed], fed - 3)
                out.append(stream.feed(answer[:fed], final=False))
                times.append(time.perf_counter() - t)
            tail = sorted(times[-30:])[15] * 1e6
            print(f"{n} tokens, stop strings {len(stop)}: {name} {tail:.0f} us a round (median of the last 30)")
