from dify_plugin import ToolProvider


class EchoProvider(ToolProvider):
    def _validate_credentials(self, credentials):
        pass
