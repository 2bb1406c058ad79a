-- Router batch: dedup, intents, rejections and acks in one atomic step.
-- KEYS[1] decision stream, KEYS[2] intent stream (partition 0's with QT_PARTITIONS > 1), KEYS[3] rejected stream,
-- KEYS[3 + i] dedup key of the i-th valid decision, then the intent streams of partitions 1, 2, ... (if any).
-- ARGV: group, window_s, timestamp, then two MessagePack arrays, then ARGV[6] ("1": partitions, see below):
--   ARGV[4], per valid decision: entry_id, intent payload (JSON), trace_id, correlation_id,
--            original fields (JSON object), partition (0 with one partition);
--   ARGV[5], per invalid decision: {entry_id, {rejection fields...}}.
-- (Packed: the client spent more time packing thousands of arguments than the server unpacking two.)
-- An entry another router already acknowledged is skipped: each decision is routed once.
-- Returns {intents, duplicates, invalid, skipped, duplicate entry ids...}.
-- With partitions (ARGV[6] = "1", the last KEYS the id counter): each intent gets its id from one counter for
-- every partition, so intent ids stay unique across the partitions' streams (the gate's counts, the in-flight
-- orders and the results name an intent by its id alone); "*" in one script would number each stream alike.
-- A partition's stream someone wrote to directly may hold an id at or past the counter's: the intent then
-- takes an id past that stream's newest (an XADD below it would fail after the decision's XACK, losing it).
local group = ARGV[1]
local allocate = nil
local last_ms, last_seq = 0, 0
if ARGV[6] == '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local ms, seq = string.match(redis.call('GET', KEYS[#KEYS]) or '0-0', '^(%d+)-(%d+)$')
  last_ms, last_seq = tonumber(ms or '0'), tonumber(seq or '0')
  allocate = function()
    if now > last_ms then last_ms, last_seq = now, 0 else last_seq = last_seq + 1 end
    return string.format('%.0f-%.0f', last_ms, last_seq)
  end
end
local window = tonumber(ARGV[2])
local stamp = ARGV[3]
local valid = cmsgpack.unpack(ARGV[4])
local invalid_list = cmsgpack.unpack(ARGV[5])
local n_valid = #valid / 6
local pos = 1
local intents, dups, invalid, skipped = 0, 0, 0, 0
local dup_ids = {}

for i = 1, n_valid do
  local id, payload, trace, corr, original = valid[pos], valid[pos + 1], valid[pos + 2], valid[pos + 3], valid[pos + 4]
  local partition = tonumber(valid[pos + 5])
  local stream = KEYS[2]
  if partition > 0 then stream = KEYS[3 + n_valid + partition] end
  pos = pos + 6
  if redis.call('XACK', KEYS[1], group, id) == 1 then
    if redis.call('SET', KEYS[3 + i], id, 'NX', 'EX', window) then
      local fields = {'event_type', 'trade.intent', 'payload', payload, 'trace_id', trace, 'correlation_id', corr,
                      'timestamp', stamp, 'source', 'router'}
      if not allocate then
        redis.call('XADD', stream, '*', unpack(fields))
      elseif type(redis.pcall('XADD', stream, allocate(), unpack(fields))) == 'table' then
        local info = redis.call('XINFO', 'STREAM', stream)
        for at = 1, #info, 2 do
          if info[at] == 'last-generated-id' then
            local ms, seq = string.match(info[at + 1], '^(%d+)-(%d+)$')
            ms, seq = tonumber(ms), tonumber(seq)
            if ms > last_ms or (ms == last_ms and seq > last_seq) then last_ms, last_seq = ms, seq end
          end
        end
        redis.call('XADD', stream, allocate(), unpack(fields))
      end
      intents = intents + 1
    else
      local detail = 'decision already routed within ' .. window .. 's (dedup key ' .. KEYS[3 + i] .. ')'
      local rejection = '{"reason":"DUPLICATE_SKIP","detail":' .. cjson.encode(detail) ..
                        ',"field":"","original_id":' .. cjson.encode(id) .. ',"original":' .. original .. '}'
      redis.call('XADD', KEYS[3], '*', 'event_type', 'decision.rejected', 'payload', rejection, 'trace_id', trace,
                 'correlation_id', corr, 'timestamp', stamp, 'source', 'router', 'reason', 'DUPLICATE_SKIP',
                 'original_id', id)
      dups = dups + 1
      dup_ids[#dup_ids + 1] = id
    end
  else
    skipped = skipped + 1
  end
end

for _, item in ipairs(invalid_list) do
  local id, fields = item[1], item[2]
  if redis.call('XACK', KEYS[1], group, id) == 1 then
    redis.call('XADD', KEYS[3], '*', unpack(fields))
    invalid = invalid + 1
  else
    skipped = skipped + 1
  end
end

if allocate and last_ms > 0 then redis.call('SET', KEYS[#KEYS], string.format('%.0f-%.0f', last_ms, last_seq)) end
local out = {intents, dups, invalid, skipped}
for _, id in ipairs(dup_ids) do out[#out + 1] = id end
return out
