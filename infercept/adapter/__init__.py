"""The one place where InferCept touches vLLM internals.

Everything under `infercept.adapter` is coupled to vLLM 0.32.0: the scheduler
subclass, the KV connector and the plugin. Importing this package checks the
installed vLLM version and fails loudly on any other, because the hooks we
override are ones vLLM calls non-public.
"""

from infercept.adapter.version import check_vllm_version

check_vllm_version()
