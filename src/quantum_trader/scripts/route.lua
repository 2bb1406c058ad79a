-- Router batch: dedup, intents, rejections and acks in one atomic step.
-- KEYS[1] decision stream, KEYS[2] intent stream, KEYS[3] rejected stream,
-- KEYS[3 + i] dedup key of the i-th valid decision.
-- ARGV: group, window_s, n_valid, n_invalid, then per valid decision:
--   entry_id, n_intent, intent fields..., n_dup, duplicate-rejection fields...
-- then per invalid decision: entry_id, n_rej, rejection fields...
-- An entry another router already acknowledged is skipped: each decision is routed once.
-- Returns {intents, duplicates, invalid, skipped, duplicate entry ids...}.
local group = ARGV[1]
local window = tonumber(ARGV[2])
local n_valid = tonumber(ARGV[3])
local n_invalid = tonumber(ARGV[4])
local pos = 5
local intents, dups, invalid, skipped = 0, 0, 0, 0
local dup_ids = {}

local function take(count)
  local out = {}
  for j = 1, count do out[j] = ARGV[pos + j - 1] end
  pos = pos + count
  return out
end

for i = 1, n_valid do
  local id = ARGV[pos]; pos = pos + 1
  local n_intent = tonumber(ARGV[pos]); pos = pos + 1
  local intent = take(n_intent)
  local n_dup = tonumber(ARGV[pos]); pos = pos + 1
  local dup = take(n_dup)
  if redis.call('XACK', KEYS[1], group, id) == 1 then
    if redis.call('SET', KEYS[3 + i], id, 'NX', 'EX', window) then
      redis.call('XADD', KEYS[2], '*', unpack(intent))
      intents = intents + 1
    else
      redis.call('XADD', KEYS[3], '*', unpack(dup))
      dups = dups + 1
      dup_ids[#dup_ids + 1] = id
    end
  else
    skipped = skipped + 1
  end
end

for _ = 1, n_invalid do
  local id = ARGV[pos]; pos = pos + 1
  local n_rej = tonumber(ARGV[pos]); pos = pos + 1
  local rej = take(n_rej)
  if redis.call('XACK', KEYS[1], group, id) == 1 then
    redis.call('XADD', KEYS[3], '*', unpack(rej))
    invalid = invalid + 1
  else
    skipped = skipped + 1
  end
end

local out = {intents, dups, invalid, skipped}
for _, id in ipairs(dup_ids) do out[#out + 1] = id end
return out
