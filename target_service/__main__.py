"""python -m target_service: host the target model behind TargetService.Verify."""

import asyncio

from specdec.config import parse_config
from specdec.serving import configure_logging
from target_service.config import TargetConfig
from target_service.server import main

if __name__ == "__main__":
    config = parse_config(TargetConfig, None, __doc__, "SPECDEC_TARGET_", prog="python -m target_service")
    configure_logging(config.log_level)
    asyncio.run(main(config))
