// http_openai.cjs - kvrelay's HTTP API through the official `openai` npm package (an
// independent client): completions and chat, streaming and not, stop, seed, usage, and
// temperature-0 text equal to llama2.c's golden outputs. Run by test_http.py with
// NODE_PATH pointing at the package and KVR_HTTP_BASE, KVR_GOLDEN (JSON: [{prompt, text}])
// and KVR_MODEL set. Prints one line per check; exits 1 on the first failure.
'use strict';
const OpenAI = require('openai');

const base = process.env.KVR_HTTP_BASE;
const model = process.env.KVR_MODEL;
const golden = JSON.parse(process.env.KVR_GOLDEN);
const client = new OpenAI({ baseURL: base + '/v1', apiKey: 'unused', maxRetries: 0, timeout: 120000 });

let failed = 0;
function check(cond, what, detail) {
  if (cond) {
    console.log('ok   ' + what);
  } else {
    console.log('FAIL ' + what + (detail !== undefined ? ': ' + JSON.stringify(detail) : ''));
    failed++;
  }
}

// The continuation llama2.c printed after the prompt (its text starts with the prompt).
function continuation(g) {
  if (!g.text.startsWith(g.prompt)) throw new Error('golden text does not start with its prompt');
  return g.text.slice(g.prompt.length);
}

async function streamText(params) {
  const stream = await client.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
  let text = '', finish = null, usage = null, n = 0;
  for await (const chunk of stream) {
    n++;
    if (chunk.usage) usage = chunk.usage;
    if (chunk.choices.length) {
      text += chunk.choices[0].text;
      if (chunk.choices[0].finish_reason) finish = chunk.choices[0].finish_reason;
    } else {
      check(chunk.usage && chunk.usage.total_tokens > 0, 'the usage chunk has choices: [] and usage');
    }
  }
  return { text, finish, usage, n };
}

async function main() {
  const models = await client.models.list();
  check(models.data.length === 1 && models.data[0].id === model, 'GET /v1/models lists the served model', models.data);

  // Temperature 0 equals llama2.c for every golden run: run forwards positions 0..255 and
  // prints the token each one predicts, so 257 ids in all, BOS and prompt included.
  for (const g of golden) {
    const prompt = g.prompt === '' ? [1] : g.prompt;
    const probe = await client.completions.create({ model, prompt, max_tokens: 1, temperature: 0 });
    const P = probe.usage.prompt_tokens;
    const r = await client.completions.create({ model, prompt, max_tokens: 257 - P, temperature: 0 });
    const want = continuation(g);
    check(r.choices[0].text === want, `golden "${g.prompt}" (non-streaming, ${r.usage.completion_tokens} tokens)`,
          { got: r.choices[0].text.slice(0, 80), want: want.slice(0, 80) });
    check(r.object === 'text_completion' && r.usage.prompt_tokens === P &&
          r.usage.total_tokens === P + r.usage.completion_tokens, 'usage adds up', r.usage);
    const s = await streamText({ model, prompt, max_tokens: 257 - P, temperature: 0 });
    check(s.text === want, `golden "${g.prompt}" (streaming, ${s.n} chunks)`, { got: s.text.slice(0, 80) });
    check(s.finish === r.choices[0].finish_reason, 'same finish reason streaming and not', [s.finish, r.choices[0].finish_reason]);
    check(s.usage && s.usage.completion_tokens === r.usage.completion_tokens && s.usage.prompt_tokens === P,
          'streamed usage equals the non-streamed one', s.usage);
  }

  // stop: the text ends before the first stop string, which is not returned.
  const g0 = golden[0], want0 = continuation(g0);
  for (const stop of [' girl', ['xyz-never', 'play outside'], '.']) {
    const stops = Array.isArray(stop) ? stop : [stop];
    let cut = want0.length;
    for (const s of stops) { const i = want0.indexOf(s); if (i >= 0 && i < cut) cut = i; }
    const r = await client.completions.create({ model, prompt: g0.prompt, max_tokens: 200, temperature: 0, stop });
    check(r.choices[0].text === want0.slice(0, cut) && r.choices[0].finish_reason === 'stop',
          `stop ${JSON.stringify(stop)} (non-streaming)`, r.choices[0]);
    const s = await streamText({ model, prompt: g0.prompt, max_tokens: 200, temperature: 0, stop });
    check(s.text === want0.slice(0, cut) && s.finish === 'stop', `stop ${JSON.stringify(stop)} (streaming)`, s);
    check(s.usage.completion_tokens === r.usage.completion_tokens, 'stop: the same token count both ways',
          [s.usage, r.usage]);
  }

  // seed: the same seed samples the same text; another seed another one.
  const sp = { model, prompt: g0.prompt, max_tokens: 64, temperature: 1.0, ignore_eos: true };
  const a = await client.completions.create({ ...sp, seed: 42 });
  const b = await client.completions.create({ ...sp, seed: 42 });
  const c = await client.completions.create({ ...sp, seed: 43 });
  check(a.choices[0].text === b.choices[0].text, 'seed 42 twice gives the same text');
  check(a.choices[0].text !== c.choices[0].text, 'seeds 42 and 43 give different texts');
  const as = await streamText({ ...sp, seed: 42 });
  check(as.text === a.choices[0].text, 'seed 42 streamed gives the same text');

  // Chat, plain template: the one user message is the prompt, so the reply is golden.
  const chat = await client.chat.completions.create({
    model, messages: [{ role: 'user', content: g0.prompt }], max_tokens: 40, temperature: 0, chat_template: 'plain' });
  check(chat.object === 'chat.completion' && chat.choices[0].message.role === 'assistant', 'chat response shape', chat);
  const r40 = await client.completions.create({ model, prompt: g0.prompt, max_tokens: 40, temperature: 0 });
  check(chat.choices[0].message.content === r40.choices[0].text, 'chat (plain template) equals the completion',
        [chat.choices[0].message.content, r40.choices[0].text]);

  // Chat, llama2 template (the default): one user turn is "[INST] u [/INST]" after BOS.
  const llama = await client.chat.completions.create({
    model, messages: [{ role: 'user', content: '  Tell me a story ' }], max_tokens: 30, temperature: 0 });
  const same = await client.completions.create({ model, prompt: '[INST] Tell me a story [/INST]', max_tokens: 30, temperature: 0 });
  check(llama.choices[0].message.content === same.choices[0].text && llama.usage.prompt_tokens === same.usage.prompt_tokens,
        'chat (llama2 template) equals the completion of "[INST] u [/INST]"', [llama.usage, same.usage]);
  const sys = await client.chat.completions.create({
    model, messages: [{ role: 'system', content: 'Be kind.' }, { role: 'user', content: 'Hi' }], max_tokens: 5, temperature: 0 });
  const sysSame = await client.completions.create({
    model, prompt: '[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi [/INST]', max_tokens: 5, temperature: 0 });
  check(sys.choices[0].message.content === sysSame.choices[0].text && sys.usage.prompt_tokens === sysSame.usage.prompt_tokens,
        'chat (llama2 template) folds the system message into the first turn', [sys.usage, sysSame.usage]);

  // Chat streaming: role first, then content deltas, a finish chunk, usage, [DONE].
  const cs = await client.chat.completions.create({
    model, messages: [{ role: 'user', content: g0.prompt }], max_tokens: 40, temperature: 0, chat_template: 'plain',
    stream: true, stream_options: { include_usage: true } });
  let content = '', role = null, finish = null, usage = null, first = true, objects = true;
  for await (const chunk of cs) {
    objects = objects && chunk.object === 'chat.completion.chunk';
    if (first) { role = chunk.choices[0] && chunk.choices[0].delta.role; first = false; }
    if (chunk.usage) usage = chunk.usage;
    if (chunk.choices.length) {
      content += chunk.choices[0].delta.content || '';
      if (chunk.choices[0].finish_reason) finish = chunk.choices[0].finish_reason;
    }
  }
  check(role === 'assistant' && objects && content === r40.choices[0].text && finish === 'length' &&
        usage && usage.completion_tokens === 40, 'chat streaming', { role, finish, usage });

  // Refused fields and errors as the client sees them: a 400 naming the field.
  for (const [field, value] of [['n', 2], ['logprobs', 1], ['echo', true], ['best_of', 3], ['suffix', 'x']]) {
    try {
      await client.completions.create({ model, prompt: 'x', [field]: value });
      check(false, `${field} is refused`);
    } catch (e) {
      check(e.status === 400 && e.error && e.error.param === field && e.error.type === 'invalid_request_error',
            `${field}=${JSON.stringify(value)} is refused with 400 naming it`, { status: e.status, error: e.error });
    }
  }
  try {
    await client.completions.create({ model: 'no-such-model', prompt: 'x' });
    check(false, 'an unknown model is refused');
  } catch (e) {
    check(e.status === 404 && e.error.code === 'model_not_found', 'an unknown model gives 404', e.error);
  }
  if (failed) {
    console.log(`${failed} checks failed`);
    process.exit(1);
  }
  console.log('all openai checks passed');
}

main().catch((e) => {
  console.log('FAIL exception: ' + (e && e.stack ? e.stack : e));
  process.exit(1);
});
