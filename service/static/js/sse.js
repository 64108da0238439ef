/* The text/event-stream reader: turns a streamed Response body into parsed JSON payloads of its
 * `data:` lines (heartbeat comments and other fields are skipped), handing each to a callback. */

/** Incremental text/event-stream parser: push() text chunks, get back parsed JSON payloads. */
function createSseParser() {
  let buffer = '';

  function parseBlock(block) {
    const data = [];
    for (const line of block.split('\n')) {
      if (line === '' || line.startsWith(':')) continue; // comment / heartbeat
      if (line.startsWith('data:')) {
        const value = line.slice(5);
        data.push(value.startsWith(' ') ? value.slice(1) : value);
      }
      // Other fields (event:, id:, retry:) are not used by this API.
    }
    if (!data.length) return null;
    try {
      return JSON.parse(data.join('\n'));
    } catch (_) {
      console.warn('qwen-box: ignoring malformed event', data.join('\n'));
      return null;
    }
  }

  function drain(final) {
    // A chunk may end between "\r" and "\n": keep a trailing "\r" until more text arrives.
    let text = buffer;
    let carry = '';
    if (!final && text.endsWith('\r')) {
      carry = '\r';
      text = text.slice(0, -1);
    }
    const blocks = text.replace(/\r\n?/g, '\n').split('\n\n');
    buffer = (final ? '' : blocks.pop()) + carry;
    return blocks.map(parseBlock).filter(Boolean);
  }

  return {
    push(chunk) {
      buffer += chunk;
      return drain(false);
    },
    end() {
      return drain(true);
    },
  };
}

/**
 * Read `response`'s event stream, calling `onEvent(payload)` for each event until it returns
 * something (then the stream is cancelled and that is returned) or the body ends (null).
 * Throws on network failure or abort.
 */
export async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const parser = createSseParser();

  const handle = (events) => {
    for (const event of events) {
      const outcome = onEvent(event);
      if (outcome) return outcome;
    }
    return null;
  };

  for (;;) {
    const { value, done } = await reader.read();
    const outcome = done
      ? handle(parser.push(decoder.decode())) || handle(parser.end())
      : handle(parser.push(decoder.decode(value, { stream: true })));
    if (outcome) {
      reader.cancel().catch(() => {});
      return outcome;
    }
    if (done) return null;
  }
}
