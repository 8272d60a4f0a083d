from dify_plugin import Tool


class EchoTool(Tool):
    def _invoke(self, tool_parameters):
        text = tool_parameters["text"]
        yield self.create_text_message(text)
        yield self.create_json_message({"echo": text, "length": len(text)})
