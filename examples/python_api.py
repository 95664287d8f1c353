"""Run a few prompts through a local two-tier cluster from Python (bundled model).

    python examples/python_api.py
"""

from glinthawk import LLM, SamplingParams

prompts = ["The built-in function", "A class definition", "When an exception is raised"]

with LLM(tier2_nodes=2) as llm:
    for output in llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=40, seed=0)):
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
    answer = llm.chat([{"role": "user", "content": "What does the with statement do?"}],
                      SamplingParams(temperature=0, max_tokens=40))
    print(answer[0].outputs[0].text)
