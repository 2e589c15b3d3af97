"""E-mail out: the `smtp` sink (one mail per message, `Message-ID` from the message id)."""

from typing import Never

from busway import Adapter
from busway.adapters.smtp.sink import SmtpSink, SmtpSinkConfig

__all__ = ["SmtpSink", "SmtpSinkConfig", "adapter"]

adapter: Adapter[Never, SmtpSinkConfig] = Adapter(
    type="smtp",
    sink_config=SmtpSinkConfig,
    create_sink=SmtpSink,
)
