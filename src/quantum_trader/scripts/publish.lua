-- Decisions written to the partitions of the decision stream (QT_PARTITIONS > 1), each with an id no other
-- decision stream holds: results and rejections name a decision by its entry id alone.
-- KEYS[1] the one decision stream, KEYS[2] the decision id counter, KEYS[3..] the stream of each decision.
-- ARGV[1] one MessagePack array of each decision's flat fields, in KEYS[3..]'s order.
-- Each id is past the counter and past the one stream's newest id; the one stream's next "*" id is then
-- moved past it (XSETID), so a publisher writing there never repeats one either. Returns the ids.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function parse(id)
  local ms, seq = string.match(id or '0-0', '^(%d+)-(%d+)$')
  return tonumber(ms or '0'), tonumber(seq or '0')
end
local last_ms, last_seq = parse(redis.call('GET', KEYS[2]))
-- A stream someone wrote to directly may hold ids past the counter's: ours go past them too (an XADD below a
-- stream's newest id would fail halfway through the batch).
local seen = {}
local function past_newest(stream)
  if seen[stream] or redis.call('EXISTS', stream) == 0 then return end
  seen[stream] = true
  local info = redis.call('XINFO', 'STREAM', stream)
  for at = 1, #info, 2 do
    if info[at] == 'last-generated-id' then
      local ms, seq = parse(info[at + 1])
      if ms > last_ms or (ms == last_ms and seq > last_seq) then last_ms, last_seq = ms, seq end
    end
  end
end
past_newest(KEYS[1])
local ids = {}
for i, fields in ipairs(cmsgpack.unpack(ARGV[1])) do
  past_newest(KEYS[2 + i])
  if now > last_ms then last_ms, last_seq = now, 0 else last_seq = last_seq + 1 end
  local id = string.format('%.0f-%.0f', last_ms, last_seq)
  ids[i] = redis.call('XADD', KEYS[2 + i], id, unpack(fields))
end
if #ids > 0 then
  local newest = string.format('%.0f-%.0f', last_ms, last_seq)
  redis.call('SET', KEYS[2], newest)
  if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('XSETID', KEYS[1], newest) end
end
return ids
