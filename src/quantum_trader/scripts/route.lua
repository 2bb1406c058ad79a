-- Router batch: dedup, intents, rejections and acks in one atomic step.
-- KEYS[1] decision stream, KEYS[2] intent stream, KEYS[3] rejected stream,
-- KEYS[3 + i] dedup key of the i-th valid decision.
-- ARGV: group, window_s, timestamp, then two MessagePack arrays:
--   ARGV[4], per valid decision: entry_id, intent payload (JSON), trace_id, correlation_id,
--            original fields (JSON object);
--   ARGV[5], per invalid decision: {entry_id, {rejection fields...}}.
-- (Packed: the client spent more time packing thousands of arguments than the server unpacking two.)
-- An entry another router already acknowledged is skipped: each decision is routed once.
-- Returns {intents, duplicates, invalid, skipped, duplicate entry ids...}.
local group = ARGV[1]
local window = tonumber(ARGV[2])
local stamp = ARGV[3]
local valid = cmsgpack.unpack(ARGV[4])
local invalid_list = cmsgpack.unpack(ARGV[5])
local n_valid = #valid / 5
local pos = 1
local intents, dups, invalid, skipped = 0, 0, 0, 0
local dup_ids = {}

for i = 1, n_valid do
  local id, payload, trace, corr, original = valid[pos], valid[pos + 1], valid[pos + 2], valid[pos + 3], valid[pos + 4]
  pos = pos + 5
  if redis.call('XACK', KEYS[1], group, id) == 1 then
    if redis.call('SET', KEYS[3 + i], id, 'NX', 'EX', window) then
      redis.call('XADD', KEYS[2], '*', 'event_type', 'trade.intent', 'payload', payload, 'trace_id', trace,
                 'correlation_id', corr, 'timestamp', stamp, 'source', 'router')
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

local out = {intents, dups, invalid, skipped}
for _, id in ipairs(dup_ids) do out[#out + 1] = id end
return out
