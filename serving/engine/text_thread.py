"""The scheduler's detokenize thread: tokens -> text deltas, stop strings, the usage.

The device thread queues ("token", sample, id, logprob, finish, stop id), ("end", sample,
reason) and ("fail", state, failure) items; this thread turns each sample's ids into
UTF-8-safe text (checkpoints/detokenizer.py), holds back what may begin a stop string
(serving/engine/stops.py), cuts on a match, and when every sample of a request is done
sends its Usage. Ending a sample here wakes the device thread, which frees the slot.
"""

from __future__ import annotations

import logging
import time
import traceback

from serving.engine.requests import INTERNAL, Delta, Failure, Sample, Usage
from serving.engine.stops import StopStrings

log = logging.getLogger("flaxserve.engine")


class TextThread:
    """Mixed into Scheduler: the body of its detokenize thread (`_detok_main`)."""

    def _detok_main(self) -> None:
        while True:
            item = self._detok_q.get()
            if item is None:
                return
            try:
                self._detok_one(item)
            except Exception as e:  # never leave a request hanging
                log.error("detokenize failed:\n%s", traceback.format_exc())
                st = item[1] if item[0] == "fail" else item[1].state
                self._close(st, Failure(INTERNAL, f"detokenize failed: {e}"))

    def _sample_text_state(self, sample: Sample) -> None:
        if sample.stops is None:
            req = sample.state.request
            sample.stops = StopStrings(sample.sampling.stop,
                                       sample.sampling.include_stop_str_in_output)
            if self.tokenizer is not None:
                from checkpoints.detokenizer import IncrementalDetokenizer
                sample.detok = IncrementalDetokenizer(self.tokenizer, sample.state.prompt,
                                                      req.skip_special_tokens)

    def _detok_one(self, item) -> None:
        kind = item[0]
        if kind == "fail":
            self._close(item[1], item[2])
            return
        sample = item[1]
        st = sample.state
        if sample.text_done or st.closed:
            return
        self._sample_text_state(sample)
        if kind == "end":
            self._finish_sample(sample, Delta(sample.index, [], finish_reason=item[2]))
            return
        _, _, token, lp, finish, stop_id = item
        sample.completion_tokens += 1
        piece = sample.detok.add(token) if sample.detok is not None else ""
        text = sample.stops.feed(piece)
        delta = Delta(sample.index, [token], text, [lp] if lp is not None else [])
        if sample.stops.matched is None and finish is not None:
            if sample.detok is not None:
                delta.text += sample.stops.feed(sample.detok.flush())
            if sample.stops.matched is None:
                delta.text += sample.stops.flush()
        if sample.stops.matched is not None:
            delta.finish_reason, delta.stop_sequence = "stop", sample.stops.matched
        elif finish is not None:
            delta.finish_reason, delta.stop_token_id = finish, stop_id
        if delta.finish_reason is None:
            st.handle.put(delta)
        else:
            self._finish_sample(sample, delta)

    def _finish_sample(self, sample: Sample, delta: Delta) -> None:
        st = sample.state
        sample.text_done = True
        self._wake()                      # the device thread frees the slot
        if st.request.variants is not None:
            from sampling.variants import metrics
            c = sample.completion_tokens  # the tokens it reported (the device may be ahead)
            delta.metrics = metrics(sample.tokens[:c], sample.raw_logprobs[:c],
                                    sample.entropies[:c])
        st.handle.put(delta)
        st.finished_samples += 1
        if st.finished_samples == len(st.samples):
            now = time.monotonic()
            req = st.request
            seed = req.seed if req.seed < 2 ** 63 else req.seed - 2 ** 64
            self._close(st, Usage(
                prompt_tokens=len(st.prompt),
                completion_tokens=sum(s.completion_tokens for s in st.samples),
                cached_tokens=st.cached_tokens, gpu_seconds=st.gpu_seconds,
                queue_time=((st.admitted or now) - req.arrival),
                ttft=((st.first_token or now) - req.arrival), seed=seed,
                prompt_logprobs=st.prompt_logprobs,
                speculative=dict(st.speculative) if st.speculative else None))
