"""python -m draft_service: host a drafter (n-gram lookup or a causal LM) behind DraftService.Propose."""

import asyncio
import sys

from draft_service.config import DraftConfig
from draft_service.server import main
from specdec.config import parse_config
from specdec.tracing import install as install_tracing
from specdec.serving import StartupError, configure_logging

if __name__ == "__main__":
    config = parse_config(DraftConfig, None, __doc__, "SPECDEC_DRAFT_", prog="python -m draft_service")
    configure_logging(config.log_level, config.log_format)
    install_tracing("specdec-draft", config.trace_exporter, config.otlp_endpoint)
    try:
        asyncio.run(main(config))
    except StartupError as exc:
        print(f"draft_service: {exc}", file=sys.stderr)
        sys.exit(2)
