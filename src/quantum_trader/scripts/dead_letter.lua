-- Set entries aside: acknowledge each one and write its dead letter, atomically.
-- KEYS[1] origin stream, KEYS[2] dead-letter stream.
-- ARGV[1] group, ARGV[2] one MessagePack array of {entry id, {dead-letter fields, flat}}.
-- The XACK gates the write: an entry another consumer has just finished (acknowledged with its
-- outcome) gets no dead letter as a second outcome.
-- Returns the ids set aside.
local group = ARGV[1]
local done = {}
for _, item in ipairs(cmsgpack.unpack(ARGV[2])) do
  if redis.call('XACK', KEYS[1], group, item[1]) == 1 then
    redis.call('XADD', KEYS[2], '*', unpack(item[2]))
    done[#done + 1] = item[1]
  end
end
return done
