using Distributed.Comm;

namespace Distributed.Tests;

/// <summary>
/// Chunks handed over in place (a frame still in a shared-memory ring): the transport gets its bytes back only when
/// no receive can read them any more, and a receive always reads the bytes that were sent.
/// </summary>
public class MailboxTests
{
    static Mailbox NewMailbox()
    {
        var mailbox = new Mailbox();
        mailbox.Reset(3, rank: 0, worldSize: 2);
        mailbox.RegisterGroup(0, [0, 1]);
        return mailbox;
    }

    static ChunkHeader From1(long op) => new(3, 1, 0, op, 0, 0);

    [Fact]
    public async Task ABorrowedChunkNobodyWaitsForIsCopiedAndItsFrameReleasedAtOnce()
    {
        var mailbox = NewMailbox();
        var frame = new byte[] { 1, 2, 3, 4 };
        var borrowed = ReceivedChunk.Borrowed(frame);
        mailbox.Deliver(From1(5), borrowed);
        Assert.True(borrowed.WaitUntilReleased(TimeSpan.Zero, default), "a parked chunk must not hold the ring's frame");
        frame.AsSpan().Fill(9);   // the writer reuses the frame
        using var received = await mailbox.ReceiveAsync(1, 0, 5, 0, TimeSpan.FromSeconds(5), default);
        Assert.Equal([1, 2, 3, 4], received.Payload.ToArray());
    }

    [Fact]
    public async Task ABorrowedChunkAWaitingReceiveTakesIsReleasedWhenTheReceiveDisposesIt()
    {
        var mailbox = NewMailbox();
        var frame = new byte[] { 5, 6, 7, 8 };
        var pending = mailbox.ReceiveAsync(1, 0, 6, 0, TimeSpan.FromSeconds(5), default);
        Assert.False(pending.IsCompleted);
        var borrowed = ReceivedChunk.Borrowed(frame);
        mailbox.Deliver(From1(6), borrowed);
        var received = await pending;
        Assert.Same(borrowed, received);   // no copy
        Assert.False(borrowed.WaitUntilReleased(TimeSpan.Zero, default), "the receive still reads the frame");
        Assert.Equal([5, 6, 7, 8], received.Payload.ToArray());
        received.Dispose();
        Assert.True(borrowed.WaitUntilReleased(TimeSpan.Zero, default));
    }

    [Fact]
    public void ABorrowedChunkTheMailboxRejectsIsReleased()
    {
        var mailbox = NewMailbox();
        var borrowed = ReceivedChunk.Borrowed(new byte[4]);
        Assert.Throws<StaleGenerationException>(() => mailbox.Deliver(From1(7) with { Generation = 2 }, borrowed));
        Assert.True(borrowed.WaitUntilReleased(TimeSpan.Zero, default));
    }
}
